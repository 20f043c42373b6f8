"""KV cache of the dense GQA model (model/gqa.py), retrofitted or not: per layer the RoPE'd keys
and the values of its G kv heads, (B, L, G, d) each, and for a layer with an indexer the indexer
key (B, L, d_I). Preallocated (max_batch, max_length) and written in place; the slot bookkeeping
(`length`, `key_valid`, `begin` / `commit`, `select_rows`, `nbytes`) is the latent cache's
(`cache.PreallocatedCache`).

The model calls `update(layer, k, v, k_index, start)`, which stores the new rows at slots start..
and returns every row so far. A sparse layer then scores all L indexer keys (O(L · H_I · d_I) per
decoded token) and attends over only the k selected K/V rows (O(k · H · d)), as V3.2 does over
its latent cache.

`fp8=True` stores K, V and the indexer key in FP8 e4m3 with one power-of-two scale per 128
values of a head's row (`dsv32.fp8`, the latent cache's format): 1 byte a number plus 4 bytes a
block instead of 2 (bf16) or 4 (float32). Simulated as there: reads dequantise every row to the
compute dtype. Left out: paged storage.
"""

from __future__ import annotations

import torch

from .. import fp8 as fp8_format
from ..model.gqa_config import DenseConfig
from .cache import PreallocatedCache


class GQACache(PreallocatedCache):
    def __init__(self, cfg: DenseConfig, max_batch: int, max_length: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", fp8: bool = False) -> None:
        self.fp8 = fp8
        G, d = cfg.num_key_value_heads, cfg.head_dim
        kv = self._encode({"k": torch.zeros(1, 1, G, d, dtype=dtype), "v": torch.zeros(1, 1, G, d, dtype=dtype)})
        layers = []
        for i in range(cfg.num_hidden_layers):
            parts = dict(kv)
            if cfg.has_indexer(i):
                parts.update(self._encode({"k_index": torch.zeros(1, 1, cfg.indexer.head_dim)}))
            layers.append({name: (tuple(t.shape[2:]), t.dtype) for name, t in parts.items()})
        self._allocate(layers, max_batch, max_length, cfg.max_position_embeddings, device)

    def _encode(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.fp8:
            return rows
        out = {}
        for name, x in rows.items():
            out[name], out[f"{name}_scale"] = fp8_format.quantize(x)
        return out

    def _decode(self, parts: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
        if not self.fp8:
            return parts[name]
        return fp8_format.dequantize(parts[name], parts[f"{name}_scale"], dtype=dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_index: torch.Tensor | None, start: int):
        """Store the new rows k, v (B, T, G, d) and k_index (B, T, d_I) at slots start..; return
        all rows so far (k_index None for a layer without an indexer)."""
        rows = {"k": k, "v": v}
        if k_index is not None and "k_index" in self._store[layer]:
            rows["k_index"] = k_index
        parts = self._write(layer, self._encode(rows), start)
        k_all, v_all = self._decode(parts, "k", k.dtype), self._decode(parts, "v", v.dtype)
        return k_all, v_all, (self._decode(parts, "k_index", torch.float32) if "k_index" in parts else None)
