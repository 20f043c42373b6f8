"""Attention kernels behind one dispatch.

`sparse_mla(q, kv, indices, scale, dv, backend=...)` computes absorbed-MLA attention of each
query over its selected latent rows only (shapes in `reference.py`). Backends:

* ``"reference"`` — dense masked computation (builds the T×S scores; tests only);
* ``"torch"``     — blocked gather in plain torch (CPU and GPU), forward and backward;
* ``"triton"``    — fused GPU kernels, registered only when CUDA and triton are present.

``"auto"`` picks triton on CUDA when it is available, else torch. A backend is a function with
the signature of `sparse_mla_torch`; `register_backend` adds one (the Triton module registers
itself lazily, so nothing GPU-only is imported on CPU).

The indexer's top-k selection has one fast path, the same way: `index_selector(device)` returns
the fused Triton selector (signature of `dsv32.model.indexer.select_topk`) on CUDA when triton
is available, else None, and the caller keeps its torch path.
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import indices_to_mask, masked_attention, sparse_mla_reference
from .torch_sparse import sparse_mla_torch

SparseBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor]]
IndexSelector = Callable[..., torch.Tensor]

_BACKENDS: dict[str, SparseBackend] = {
    "reference": sparse_mla_reference,
    "torch": sparse_mla_torch,
}


_SELECTORS: dict[str, IndexSelector] = {}


def register_backend(name: str, fn: SparseBackend) -> None:
    _BACKENDS[name] = fn


def register_selector(name: str, fn: IndexSelector) -> None:
    _SELECTORS[name] = fn


def index_selector(device: torch.device) -> IndexSelector | None:
    """The fused top-k selector for tensors on `device`, or None where the torch path applies."""
    if device.type != "cuda":
        return None
    try:
        from . import triton_indexer  # noqa: F401  (registers "triton")
    except ImportError:
        return None
    return _SELECTORS.get("triton")


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from . import triton_sparse  # noqa: F401  (registers "triton")
    except ImportError:
        return False
    return "triton" in _BACKENDS


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if _triton_usable(device) else "torch"
    if backend == "triton":
        _triton_usable(device)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown sparse attention backend {backend!r}; available: "
                         f"{sorted(_BACKENDS) + ['auto']}")
    return backend


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKENDS[resolve_backend(backend, q.device)](q, kv, indices, scale, dv)


__all__ = ["sparse_mla", "sparse_mla_reference", "sparse_mla_torch", "masked_attention",
           "indices_to_mask", "register_backend", "resolve_backend", "register_selector", "index_selector"]
