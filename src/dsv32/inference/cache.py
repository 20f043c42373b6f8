"""Latent KV cache: per layer only what V3.2 needs — the MLA latent row [c_kv ; k_r]
(r_kv + d_r numbers per token) and the indexer key (d_I) — never expanded keys or values.

Two forms:

* `LatentCache` grows by concatenation (no size to choose up front);
* `StaticLatentCache` preallocates (max_batch, max_length) and writes in place; its slot
  bookkeeping is `PreallocatedCache`, which the dense GQA model's cache (gqa_cache.py) shares.

Both can store c_kv and the indexer key in FP8 e4m3 with one power-of-two scale per 128
values (`dsv32.fp8`), as production does (k_r stays in the cache dtype, as in FlashMLA's FP8 layout).
This is simulated: reads dequantise to the compute dtype, which on CPU costs one O(L)
elementwise pass per step; a GPU kernel would read the FP8 rows directly.

The model talks to a cache through: `length` (slots filled, equal for every row),
`key_valid` ((B, length) bool, or None when every slot is a real token), `begin`/`commit`
around a forward call, and `update(layer, latent, k_index, start)`, which stores the new rows
at slots start.. and returns all rows so far as (B, S, C) and (B, S, d_I).
"""

from __future__ import annotations

import torch

from .. import fp8 as fp8_format
from ..config import ModelConfig


class PreallocatedCache:
    """What every preallocated cache shares (`StaticLatentCache` below, `GQACache` in
    gqa_cache.py): per layer a dict of named tensors of (max_batch, max_length, ...) slots written
    in place (`_store`), which slots hold real tokens, and the model protocol's bookkeeping
    (`length`, `key_valid`, `begin` / `commit`), plus `select_rows` and `nbytes`. A subclass
    names what a layer holds (`_allocate`) and hands a call's new rows, encoded into those
    parts, to `_write`, which stores them and returns every row so far. A call may use fewer
    rows than max_batch; every call must use the same number."""

    def _allocate(self, layers: list[dict[str, tuple[tuple[int, ...], torch.dtype]]], max_batch: int,
                  max_length: int, max_positions: int, device: torch.device | str) -> None:
        """One dict per layer: part name -> (shape after (batch, slot), dtype)."""
        if max_batch <= 0 or max_length <= 0:
            raise ValueError(f"max_batch and max_length must be positive, got {max_batch}, {max_length}")
        if max_length > max_positions:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings {max_positions}")
        self.max_batch, self.max_length = max_batch, max_length
        self._store = [{name: torch.zeros(max_batch, max_length, *shape, dtype=dtype, device=device)
                        for name, (shape, dtype) in parts.items()} for parts in layers]
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
        per_slot = sum(t[0, 0].numel() * t.element_size() for store in self._store for t in store.values())
        return per_slot * self._rows * self.length

    def begin(self, batch: int, T: int, new_valid: torch.Tensor | None) -> None:
        if self._rows is not None and batch != self._rows:
            raise ValueError(f"cache holds {self._rows} rows, the call has {batch}")
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the cache's max_batch {self.max_batch}")
        if self.length + T > self.max_length:
            raise ValueError(f"{self.length} cached + {T} new tokens exceed the cache's max_length {self.max_length}")
        self._rows, self._pending = batch, new_valid

    def _write(self, layer: int, parts: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        """Store `parts` (each (B, T, ...)) of `layer` at slots start..; every part's rows so far."""
        if start != self.length:
            raise ValueError(f"cache holds {self.length} tokens but the call starts at slot {start}")
        store = self._store[layer]
        B, T = next(iter(parts.values())).shape[:2]
        for name, rows in parts.items():
            store[name][:B, start:start + T] = rows
        return {name: t[:B, : start + T] for name, t in store.items()}

    def commit(self, T: int) -> None:
        if self._pending is not None:
            self._valid[: self._rows, self.length: self.length + T] = self._pending
            self._any_padding = self._any_padding or not bool(self._pending.all())
        self.length += T
        self._pending = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (1-D int64, repeats allowed) of everything cached, in that order:
        prompts shared by several rows are prefilled once and then copied (`generate`)."""
        B, L = index.shape[0], self.length
        if B > self.max_batch:
            raise ValueError(f"{B} rows exceed the cache's max_batch {self.max_batch}")
        for store in self._store:
            for v in store.values():
                v[:B, :L] = v[index, :L]              # the gather copies before the write
        self._valid[:B, :L] = self._valid[index, :L]
        self._rows = B if self._rows is not None else None


class LatentCache:
    """A growing latent cache. `fp8=True` stores c_kv and the indexer key in FP8 e4m3."""

    def __init__(self, cfg: ModelConfig, *, fp8: bool = False) -> None:
        self.cfg = cfg
        self.num_layers = cfg.num_hidden_layers
        self.r = cfg.kv_lora_rank
        self.fp8 = fp8
        self._key_valid: torch.Tensor | None = None
        self.length = 0
        self._pending: torch.Tensor | None = None
        self._store: list[dict[str, torch.Tensor] | None] = [None] * self.num_layers

    # ----------------------------------------------------------------- storage format
    def _encode(self, latent: torch.Tensor, k_index: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.fp8:
            return {"latent": latent, "k_index": k_index.to(latent.dtype)}
        c_kv, k_r = latent[..., : self.r], latent[..., self.r:]
        ckv_q, ckv_s = fp8_format.quantize(c_kv)
        ki_q, ki_s = fp8_format.quantize(k_index)
        return {"c_kv": ckv_q, "c_kv_scale": ckv_s, "k_r": k_r.contiguous(), "k_index": ki_q,
                "k_index_scale": ki_s}

    def _decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fp8:
            return parts["latent"], parts["k_index"].float()
        c_kv = fp8_format.dequantize(parts["c_kv"], parts["c_kv_scale"], dtype=dtype)
        latent = torch.cat((c_kv, parts["k_r"].to(dtype)), dim=-1)
        return latent, fp8_format.dequantize(parts["k_index"], parts["k_index_scale"])

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer's cache."""
        cfg = self.cfg
        elt = torch.tensor([], dtype=self._dtype()).element_size()
        if not self.fp8:
            return (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * elt
        scales = 4 * (-(-cfg.kv_lora_rank // fp8_format.BLOCK) + -(-cfg.index_head_dim // fp8_format.BLOCK))
        return cfg.kv_lora_rank + cfg.index_head_dim + cfg.qk_rope_head_dim * elt + scales

    def nbytes(self) -> int:
        """Bytes held by the stored tokens (all layers, all rows)."""
        total = 0
        for parts in self._store:
            if parts is not None:
                total += sum(t.numel() * t.element_size() for t in parts.values())
        return total

    def _dtype(self) -> torch.dtype:
        for parts in self._store:
            if parts is not None:
                return (parts["latent"] if not self.fp8 else parts["k_r"]).dtype
        return torch.float32

    # ----------------------------------------------------------------- model protocol
    @property
    def key_valid(self) -> torch.Tensor | None:
        return self._key_valid

    def begin(self, batch: int, T: int, new_valid: torch.Tensor | None) -> None:
        if self.key_valid is not None and self.key_valid.shape[0] != batch:
            raise ValueError(f"cache holds {self.key_valid.shape[0]} rows, the call has {batch}")
        self._pending = new_valid

    def update(self, layer: int, latent: torch.Tensor, k_index: torch.Tensor, start: int):
        if start != self.length:
            raise ValueError(f"cache holds {self.length} tokens but the call starts at slot {start}")
        new = self._encode(latent, k_index)
        old = self._store[layer]
        self._store[layer] = new if old is None else {k: torch.cat((old[k], v), dim=1) for k, v in new.items()}
        return self._decode(self._store[layer], latent.dtype)

    def commit(self, T: int) -> None:
        new = self._pending
        if new is not None or self.key_valid is not None:
            ref = new if new is not None else self.key_valid
            old = self.key_valid if self.key_valid is not None else torch.ones(
                ref.shape[0], self.length, dtype=torch.bool, device=ref.device)
            new = new if new is not None else torch.ones(ref.shape[0], T, dtype=torch.bool, device=ref.device)
            self._key_valid = torch.cat((old, new), dim=1)
        self.length += T
        self._pending = None


    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (1-D int64, repeats allowed) of everything cached, in that order:
        prompts shared by several rows are prefilled once and then copied (`generate`)."""
        self._store = [None if parts is None else {k: v.index_select(0, index) for k, v in parts.items()}
                       for parts in self._store]
        if self._key_valid is not None:
            self._key_valid = self._key_valid.index_select(0, index)


class StaticLatentCache(PreallocatedCache, LatentCache):
    """A preallocated latent cache of (max_batch, max_length) slots per layer, written in place."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_length: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", fp8: bool = False) -> None:
        LatentCache.__init__(self, cfg, fp8=fp8)
        C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        template = self._encode(torch.zeros(1, 1, C, dtype=dtype, device=device),
                                torch.zeros(1, 1, cfg.index_head_dim, device=device))
        parts = {k: (tuple(v.shape[2:]), v.dtype) for k, v in template.items()}
        self._allocate([parts] * self.num_layers, max_batch, max_length, cfg.max_position_embeddings, device)

    def _dtype(self) -> torch.dtype:
        return self._store[0]["latent" if not self.fp8 else "k_r"].dtype

    def update(self, layer: int, latent: torch.Tensor, k_index: torch.Tensor, start: int):
        return self._decode(self._write(layer, self._encode(latent, k_index), start), latent.dtype)
