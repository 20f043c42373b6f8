"""What one forward pass carries through the layers, and what it brings back.

`AttentionOptions` chooses how attention is computed; `ForwardContext` holds per-call inputs
(RoPE tables, masks, cache, routing to replay) and per-layer outputs (recorded expert ids,
selected token slots, expert loads, balance losses). Outputs are stored by layer index, not
appended, so re-running a layer (activation checkpointing) records once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch


@dataclass
class AttentionOptions:
    """How attention is computed.

    sparse:  True uses the indexer's top-k (DSA); False is plain causal attention (used for
             dense pretraining and the indexer warm-up).
    form:    "expanded" (per-head keys/values, MHA) or "absorbed" (attend over the latent,
             MQA); "auto" takes absorbed for sparse attention and for decode over a cache,
             expanded otherwise. Sparse + expanded is the dense masked reference (tests only).
    backend: kernels for the top-k selection and the sparse attention (`dsv32.kernels`):
             "auto" (Triton on CUDA when available, else torch), "torch", "triton" or
             "reference" (dense T×S, tests only).
    topk:    keys selected per query; None = the config's `index_topk`. Read at every call,
             so another k needs no new model.
    dense_shortcut: True runs a layer in which every query may see all its keys (S <= topk)
             as the dense attention it equals (faster, same values); False always runs the
             sparse machinery (tests of it, benchmarks).
    """

    sparse: bool = True
    form: Literal["auto", "expanded", "absorbed"] = "auto"
    backend: str = "auto"
    topk: int | None = None
    dense_shortcut: bool = True

    def __post_init__(self) -> None:
        if self.form not in ("auto", "expanded", "absorbed"):
            raise ValueError(f"attention form must be 'auto', 'expanded' or 'absorbed', got {self.form!r}")
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, int)
                                      or self.topk < 1):
            raise ValueError(f"attention topk must be a positive int or None, got {self.topk!r}")


@dataclass
class ForwardContext:
    cos: torch.Tensor
    sin: torch.Tensor
    key_valid: torch.Tensor | None          # (B, S) bool over all key slots, None = all real
    q_start: int                            # slot of the first query (cache length before this call)
    attention: AttentionOptions
    cache: Any = None
    replay_routing: dict[int, torch.Tensor] | None = None   # layer -> (B, T, top_k) expert ids
    record_routing: bool = False
    return_indices: bool = False
    balance_alpha: float = 0.0
    routing: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)
    balance_loss: dict[int, torch.Tensor] = field(default_factory=dict)
    # Layers whose indexer inputs should be kept (detached) for indexer training: layer -> dict.
    keep_indexer_inputs: bool = False
    indexer_inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def query_valid(self, T: int) -> torch.Tensor | None:
        if self.key_valid is None:
            return None
        return self.key_valid[:, self.q_start: self.q_start + T]
