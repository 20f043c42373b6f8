"""The kernels of DeepSeek Sparse Attention behind one dispatch shape: top-k selection by the
lightning indexer, and absorbed-MLA attention over the selected latent rows. Shapes are in
`reference.py`; the selection order (score descending, then key slot ascending -- among equal
scores the earlier key wins) in `torch_indexer.py`.

    select_topk(q, w, k, topk, q_start, key_valid, window, sink, backend=...)  -> indices
    sparse_mla(q, kv, indices, scale, dv, backend=...)                          -> (out, lse)
    sparse_mla_absorbed(q_n, q_r, kv, indices, w_uk, w_uv, scale, backend=...)  -> out
    sparse_gqa(q, k, v, indices, scale, backend=...)                            -> (out, lse)

Each has the same backends:

* ``"reference"`` — plain torch over the dense T×S scores (always available; tests only);
* ``"torch"``     — blocked plain torch (CPU and GPU): no T×S tensor, buffers reused;
* ``"triton"``    — fused GPU kernels, registered only when CUDA and triton are present;
* ``"masked"``    — sparse MLA only (the selector is torch's): the same attention computed as
  dense SDPA under the selection as a mask (`torch_masked.py`), faster with few heads and short
  sequences.

``"auto"`` picks triton on CUDA when it is available, else torch; and for `sparse_mla_absorbed`
on CPU with gradients (training), where the torch kernel would run, the masked path wherever the cost
rule `torch_masked.choose_masked` (over T, S, H, k and the head dims) says it is cheaper.
A backend is a function with the signature of its torch one; `register_backend` / `register_selector` add one (the Triton
modules register themselves when first needed, so nothing GPU-only is imported on CPU).
`sparse_mla_absorbed` wraps a `sparse_mla` backend in absorb -> attend -> un-absorb
(`absorbed.py`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from .absorbed import absorb_attend
from .reference import (allowed_keys, index_scores, indices_to_mask, masked_attention,
                        select_topk_reference, sparse_mla_reference)
from .torch_indexer import index_scores_tiled, select_topk_torch
from .torch_gqa import GQABackend, sparse_gqa_reference, sparse_gqa_torch
from .torch_masked import absorb_attend_masked, choose_masked, sparse_mla_masked
from .torch_sparse import sparse_mla_torch

SparseBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor]]
IndexSelector = Callable[..., torch.Tensor]

_BACKENDS: dict[str, SparseBackend] = {
    "reference": sparse_mla_reference,
    "torch": sparse_mla_torch,
    "masked": sparse_mla_masked,
}
_SELECTORS: dict[str, IndexSelector] = {
    "reference": select_topk_reference,
    "torch": select_topk_torch,
    "masked": select_topk_torch,
}

_GQA_BACKENDS: dict[str, GQABackend] = {
    "reference": sparse_gqa_reference,
    "torch": sparse_gqa_torch,
}


def register_backend(name: str, fn: SparseBackend) -> None:
    _BACKENDS[name] = fn


def register_selector(name: str, fn: IndexSelector) -> None:
    _SELECTORS[name] = fn


def register_gqa_backend(name: str, fn: GQABackend) -> None:
    _GQA_BACKENDS[name] = fn


def _triton_usable(table: dict, module: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        importlib.import_module(f".{module}", __name__)   # registers its "triton" entry
    except ImportError:
        return False
    return "triton" in table


def _resolve(table: dict, module: str, what: str, backend: str, device: torch.device) -> str:
    """`backend` ("auto" or a name) -> a key of `table`; `module` registers the Triton entry."""
    if backend == "auto":
        return "triton" if _triton_usable(table, module, device) else "torch"
    if backend == "triton":
        _triton_usable(table, module, device)
    if backend not in table:
        raise ValueError(f"unknown {what} backend {backend!r}; available: {sorted(table) + ['auto']}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The sparse attention backend that `backend` means on `device`."""
    return _resolve(_BACKENDS, "triton_sparse", "sparse attention", backend, device)


def resolve_selector(backend: str, device: torch.device) -> str:
    """The top-k selector that `backend` means on `device`."""
    return _resolve(_SELECTORS, "triton_indexer", "top-k selection", backend, device)


def resolve_gqa_backend(backend: str, device: torch.device) -> str:
    """The sparse GQA backend that `backend` means on `device`."""
    return _resolve(_GQA_BACKENDS, "sparse_gqa_triton", "sparse GQA attention", backend, device)


def select_topk(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int = 0,
                key_valid: torch.Tensor | None = None, window: int = 0, sink: int = 0,
                backend: str = "auto", ordered: bool = True) -> torch.Tensor:
    """Selected key slots (B, T, window + sink + min(topk, S)) int64, -1 = empty; forced
    window/sink slots first, then the top-k best first. `ordered=False` lets the selector
    return each row's top-k in any order (the same set; the torch selector then skips sorting
    the winners) -- for a caller that reads the selection as a set."""
    selector = _SELECTORS[resolve_selector(backend, q.device)]
    extra = {} if ordered or selector is not select_topk_torch else {"ordered": False}
    return selector(q, w, k, topk, q_start=q_start, key_valid=key_valid, window=window, sink=sink, **extra)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKENDS[resolve_backend(backend, q.device)](q, kv, indices, scale, dv)


def sparse_mla_absorbed(q_n: torch.Tensor, q_r: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                        w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                        backend: str = "auto") -> torch.Tensor:
    """Sparse MLA from un-absorbed queries: (B, T, H, d_v) in kv's dtype; see `absorbed.py`
    (and `torch_masked.py` for the masked path, which "auto" picks by its cost rule in training)."""
    if attends_masked(q_n, q_r, kv, indices.shape[-1], w_uv, backend):
        return absorb_attend_masked(q_n, q_r, kv, indices, w_uk, w_uv, scale)
    attend = functools.partial(sparse_mla, backend=resolve_backend(backend, kv.device))
    return absorb_attend(attend, q_n, q_r, kv, indices, w_uk, w_uv, scale)


def attends_masked(q_n: torch.Tensor, q_r: torch.Tensor, kv: torch.Tensor, width: int, w_uv: torch.Tensor,
                   backend: str = "auto") -> bool:
    """Whether `sparse_mla_absorbed` with these arguments and a selection `width` slots wide
    runs the masked path, which reads the selection as a set (its order does not matter).
    "auto" applies the cost rule only on CPU (where it was measured) and with gradients (its
    crossover is measured forward+backward)."""
    name = resolve_backend(backend, kv.device)
    if name == "masked":
        return True
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q_n, q_r, kv, w_uv))
    if backend != "auto" or name != "torch" or kv.device.type != "cpu" or not training:
        return False
    B, T, H, d_n = q_n.shape
    return choose_masked(T, kv.shape[1], H, width, d_n + q_r.shape[-1], w_uv.shape[1], kv.shape[-1])


def sparse_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse grouped-query attention over the selected slots; shapes in `torch_gqa.py`."""
    return _GQA_BACKENDS[resolve_gqa_backend(backend, q.device)](q, k, v, indices, scale)


__all__ = ["select_topk", "sparse_gqa", "sparse_gqa_reference", "sparse_gqa_torch", "register_gqa_backend",
           "resolve_gqa_backend", "sparse_mla", "sparse_mla_absorbed", "select_topk_reference", "select_topk_torch",
           "sparse_mla_reference", "sparse_mla_torch", "sparse_mla_masked", "absorb_attend_masked",
           "attends_masked", "choose_masked", "index_scores", "index_scores_tiled", "allowed_keys",
           "masked_attention", "indices_to_mask", "register_backend", "register_selector", "resolve_backend",
           "resolve_selector"]
