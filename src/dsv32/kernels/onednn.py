"""oneDNN's float32 inner product (X W^T) on CPU, for the kernels that measured faster with it.

torch's CPU matrix products call MKL, which runs its AVX2 code on AMD CPUs with AVX-512; oneDNN,
also inside every torch CPU build (its compiler's linear-layer op), runs AVX-512 kernels: on the
project's development machine (AMD EPYC, one thread) ~180-200 GFLOP/s against MKL's ~80-90 for
a large float32 product. oneDNN compiles a kernel per shape (~0.5-3 ms the first time, cached
after), so its callers use it only on shapes that repeat (whole key tiles, standard blocks,
rows rounded up): torch_indexer.py (indexer scores, product + ReLU in one call) and
torch_sparse.py (the per-query attention path at many heads). Each keeps a plain-torch path,
and `torch.backends.mkldnn.enabled = False` sends every call there.

The op is private to torch (`torch.ops.mkldnn._linear_pointwise`): `onednn_op()` returns None
where this torch build lacks it, and the callers then run their torch path.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_op():
    """`torch.ops.mkldnn._linear_pointwise.default(x, w, bias, attr, scalars, algorithm)` ->
    attr(x @ w^T + bias) (attr "none" or "relu"), or None where torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None
