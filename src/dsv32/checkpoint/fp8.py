"""Block-wise FP8 (e4m3) weights, as in the DeepSeek-V3/V3.2 release: one float32 scale per
128x128 block, stored as `<name>_scale_inv` with `w = w_fp8 * scale_inv[block]`.

The arithmetic is `dsv32.fp8` (shared with the indexer simulation and the FP8 cache); this
module binds it to the checkpoint format: 2-D weights, 128x128 blocks, power-of-two "ue8m0"
scales by default (as the V3.2 release uses), and which weights the release quantises — every
linear weight inside the decoder layers except the router and the indexer's head weights;
embeddings, the LM head and norms stay in high precision.
"""

from __future__ import annotations

import re

import torch

from .. import fp8

WEIGHT_BLOCK = (fp8.BLOCK, fp8.BLOCK)
# Weight blocks keep their scale down to amax 1e-12 (activations floor at 1e-4): a block of
# tiny weights keeps its relative precision instead of rounding towards zero.
_WEIGHT_MIN_AMAX = 1e-12
QUANTIZED = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|wq_b|wk|gate_proj|up_proj|"
                       r"down_proj|eh_proj)\.weight$")


def is_quantizable(hf_key: str) -> bool:
    return hf_key.startswith("model.layers.") and bool(QUANTIZED.search(hf_key))


def _check_2d(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"block-FP8 weights are 2-D, got shape {tuple(w.shape)}")


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_fp8 * scale_inv, each scale covering one `block` of the weight, in `dtype`."""
    _check_2d(w)
    return fp8.dequantize(w, scale_inv, tuple(block), dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK,
                       pow2_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 float8_e4m3fn, scale_inv float32 (ceil(out/b0), ceil(in/b1)))."""
    _check_2d(w)
    return fp8.quantize(w, tuple(block), pow2_scales=pow2_scales, min_amax=_WEIGHT_MIN_AMAX)
