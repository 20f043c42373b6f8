"""FP8 e4m3 block quantisation: the one implementation behind every FP8 number in dsv32.

A tensor is cut into blocks over its trailing dimensions (`block`, e.g. `(128,)` for rows of
activations, `(128, 128)` for weight matrices; edge blocks are zero-padded), and each block
gets one float32 scale:

    scale = amax(|block|) / E4M3_MAX               rounded up to a power of two ("ue8m0")
    q     = float8_e4m3fn(x / scale)               |x / scale| <= E4M3_MAX by construction
    x'    = q * scale                              (dequantise)

Three users, one function each way: the indexer's simulated deployment numerics
(`model/indexer.py`, a round trip per 128 values), the FP8 caches (the latent one,
`inference/cache.py`, and the dense GQA model's K/V, `inference/gqa_cache.py`: both store `q` and
`scale`), and block-FP8 checkpoints (`checkpoint/fp8.py`, 128x128 weight blocks
whose `scale` is the release's `weight_scale_inv`).

It lives at the top of the package rather than in `kernels/` because it is a number format,
not an attention kernel with a reference and a fast path: model, inference and checkpoint code
all depend on it and it depends only on torch. Left out: scaled FP8 matmuls (this is a
simulation; every consumer dequantises before computing) and e5m2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0             # largest finite float8_e4m3fn
BLOCK = 128                  # the release's FP8 block edge (activations and weights)


def scale_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scales of a tensor of `shape` quantised in `block` blocks (trailing dims)."""
    lead = tuple(shape[: len(shape) - len(block)])
    return lead + tuple(math.ceil(d / b) for d, b in zip(shape[len(lead):], block))


def quantize(x: torch.Tensor, block: tuple[int, ...] = (BLOCK,), *, pow2_scales: bool = True,
             min_amax: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn shaped like x, scale float32 shaped `scale_shape(x.shape, block)`).

    `min_amax` floors each block's absolute maximum (an all-zero block still gets a finite
    scale); `pow2_scales=False` keeps the exact amax / E4M3_MAX scale."""
    n = len(block)
    if n == 0 or n > x.dim():
        raise ValueError(f"block must name 1..{x.dim()} trailing dims of a {tuple(x.shape)} tensor, got {block}")
    lead, dims = tuple(x.shape[: x.dim() - n]), tuple(x.shape[x.dim() - n:])
    nblk = [math.ceil(d / b) for d, b in zip(dims, block)]
    pad: list[int] = []
    for d, b, k in reversed(list(zip(dims, block, nblk))):
        pad += [0, k * b - d]
    padded = F.pad(x.float(), pad)
    blocked = padded.view(*lead, *[s for k, b in zip(nblk, block) for s in (k, b)])   # (..., n1, b1, n2, b2)
    inner = tuple(len(lead) + 2 * i + 1 for i in range(n))
    amax = blocked.abs().amax(dim=inner).clamp(min=min_amax)
    scale = amax / E4M3_MAX
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    expanded = scale
    for dim in inner:
        expanded = expanded.unsqueeze(dim)
    q = (blocked / expanded).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(padded.shape)
    return q[(..., *[slice(0, d) for d in dims])].contiguous(), scale.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, ...] = (BLOCK,),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale (broadcast over each block), in `dtype`."""
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}, expected {expected} for a "
                         f"{tuple(q.shape)} tensor in {'x'.join(map(str, block))} blocks")
    s = scale.float()
    for i, b in enumerate(block):
        dim = q.dim() - len(block) + i
        s = s.repeat_interleave(b, dim).narrow(dim, 0, q.shape[dim])
    return (q.float() * s).to(dtype)


def roundtrip(x: torch.Tensor, block: tuple[int, ...] = (BLOCK,), **options) -> torch.Tensor:
    """dequantize(quantize(x)) in float32: what a consumer of FP8 values computes with."""
    q, scale = quantize(x, block, **options)
    return dequantize(q, scale, block)
