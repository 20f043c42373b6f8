"""Block-wise FP8 (e4m3) weights, as in the DeepSeek-V3/V3.2 release: one float32 scale per
128x128 block, stored as `<name>_scale_inv` with `w = w_fp8 * scale_inv[block]`.

`quantize_blockwise` rounds a weight to that format (power-of-two "ue8m0" scales by default,
as the V3.2 release uses); `dequantize_blockwise` undoes it. Which weights the release
quantises: every linear weight inside the decoder layers except the router and the indexer's
head weights; embeddings, the LM head and norms stay in high precision.
"""

from __future__ import annotations

import math
import re

import torch

FP8_MAX = 448.0
QUANTIZED = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|wq_b|wk|gate_proj|up_proj|"
                       r"down_proj|eh_proj)\.weight$")


def is_quantizable(hf_key: str) -> bool:
    return hf_key.startswith("model.layers.") and bool(QUANTIZED.search(hf_key))


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_f, in_f = w.shape
    expected = scale_shape((out_f, in_f), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{(out_f, in_f)} weight in {block[0]}x{block[1]} blocks")
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return (w.float() * s).to(dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                       pow2_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 float8_e4m3fn, scale_inv float32 (ceil(out/b0), ceil(in/b1)))."""
    out_f, in_f = w.shape
    so, si = scale_shape((out_f, in_f), block)
    padded = torch.zeros(so * block[0], si * block[1], dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(so, block[0], si, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(so * block[0], si * block[1])[:out_f, :in_f].contiguous(), scale.float()
