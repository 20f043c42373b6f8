"""KV cache of the dense GQA model (model/gqa.py), retrofitted or not: per layer the RoPE'd keys
and the values of its G kv heads, (B, L, G, d) each, and for a layer with an indexer the indexer
key (B, L, d_I). Preallocated (max_batch, max_length) and written in place.

The model talks to it exactly as to the latent cache (inference/cache.py): `length`,
`key_valid`, `begin` / `commit` around a forward call, and `update(layer, k, v, k_index, start)`,
which stores the new rows at slots start.. and returns every row so far. A sparse layer then
scores all L indexer keys (O(L · H_I · d_I) per decoded token) and attends over only the k
selected K/V rows (O(k · H · d)), as V3.2 does over its latent cache.

Left out: an FP8 cache (refused with a clear error), paged storage.
"""

from __future__ import annotations

import torch

from ..model.gqa_config import DenseConfig
from .cache import check_room


class GQACache:
    def __init__(self, cfg: DenseConfig, max_batch: int, max_length: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if max_batch <= 0 or max_length <= 0:
            raise ValueError(f"max_batch and max_length must be positive, got {max_batch}, {max_length}")
        if max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        self.max_batch, self.max_length = max_batch, max_length
        G, d = cfg.num_key_value_heads, cfg.head_dim
        self._k = [torch.zeros(max_batch, max_length, G, d, dtype=dtype, device=device)
                   for _ in range(cfg.num_hidden_layers)]
        self._v = [torch.zeros_like(t) for t in self._k]
        self._ki = [torch.zeros(max_batch, max_length, cfg.indexer.head_dim, device=device)
                    if cfg.has_indexer(i) else None for i in range(cfg.num_hidden_layers)]
        self._valid = torch.ones(max_batch, max_length, dtype=torch.bool, device=device)
        self._any_padding = False
        self._rows: int | None = None
        self._pending: torch.Tensor | None = None
        self.length = 0

    @property
    def key_valid(self) -> torch.Tensor | None:
        if not self._any_padding or self._rows is None:
            return None
        return self._valid[: self._rows, : self.length]

    def nbytes(self) -> int:
        """Bytes held by the stored tokens (all layers, all rows)."""
        if self._rows is None:
            return 0
        per = sum(t[0, 0].numel() * t.element_size() for t in self._k + self._v + [x for x in self._ki if x is not None])
        return per * self._rows * self.length

    def begin(self, batch: int, T: int, new_valid: torch.Tensor | None) -> None:
        check_room(self, batch, T)
        self._rows, self._pending = batch, new_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_index: torch.Tensor | None, start: int):
        if start != self.length:
            raise ValueError(f"cache holds {self.length} tokens but the call starts at slot {start}")
        B, T = k.shape[:2]
        end = start + T
        self._k[layer][:B, start:end] = k
        self._v[layer][:B, start:end] = v
        ki = self._ki[layer]
        if ki is not None and k_index is not None:
            ki[:B, start:end] = k_index
        return (self._k[layer][:B, :end], self._v[layer][:B, :end],
                None if ki is None else ki[:B, :end])

    def commit(self, T: int) -> None:
        if self._pending is not None:
            self._valid[: self._rows, self.length: self.length + T] = self._pending
            self._any_padding = self._any_padding or not bool(self._pending.all())
        self.length += T
        self._pending = None
