"""Latent KV cache: per layer only what V3.2 needs — the MLA latent row [c_kv ; k_r]
(r_kv + d_r numbers per token) and the indexer key (d_I) — never expanded keys or values.

The model talks to a cache through four members: `length` (slots already filled, the same for
every row), `key_valid` ((B, length) bool, or None when every slot is a real token), `begin`
/ `commit` around a forward call, and `update(layer, latent, k_index, start)`, which stores
the new rows at slots start.. and returns all rows so far.
"""

from __future__ import annotations

import torch


class LatentCache:
    """A growing cache (concatenates per call)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.latent: list[torch.Tensor | None] = [None] * num_layers
        self.k_index: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None
        self.length = 0
        self._pending: torch.Tensor | None = None
        self._pending_len = 0

    def begin(self, batch: int, T: int, new_valid: torch.Tensor | None) -> None:
        self._pending, self._pending_len = new_valid, T

    def update(self, layer: int, latent: torch.Tensor, k_index: torch.Tensor, start: int):
        if start != self.length:
            raise ValueError(f"cache holds {self.length} tokens but the call starts at slot {start}")
        if self.latent[layer] is None:
            self.latent[layer], self.k_index[layer] = latent, k_index
        else:
            self.latent[layer] = torch.cat((self.latent[layer], latent), dim=1)
            self.k_index[layer] = torch.cat((self.k_index[layer], k_index), dim=1)
        return self.latent[layer], self.k_index[layer]

    def commit(self, T: int) -> None:
        new = self._pending
        if new is not None or self.key_valid is not None:
            B = (new if new is not None else self.key_valid).shape[0]
            device = (new if new is not None else self.key_valid).device
            old = self.key_valid if self.key_valid is not None else torch.ones(B, self.length, dtype=torch.bool,
                                                                               device=device)
            new = new if new is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            self.key_valid = torch.cat((old, new), dim=1)
        self.length += T
        self._pending = None
