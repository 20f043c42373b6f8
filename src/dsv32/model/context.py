"""What one forward pass carries through the layers, and what it brings back.

`AttentionOptions` chooses how attention is computed; `Records` is the caller's one typed
object for what the layers should record (expert ids, selected key slots, indexer inputs,
expert loads, balance losses) or replay (routing, selected key slots); `ForwardContext` is
the per-call geometry the model hands its layers (RoPE tables, masks, cache) together with
those records.
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
class IndexerInputs:
    """What a layer's indexer (and its DSA training losses) reads, kept detached by the forward
    when `Records.keep_indexer_inputs` is set. An MTP layer's tables and mask are shifted by
    its depth, so every kept entry carries its own geometry.

    x (B, T, D) the layer's normed input; c_q (B, T, r_q) the query latent; cos / sin the
    RoPE tables of the queries' positions; key_valid (B, T) bool (False = padding) or None."""

    x: torch.Tensor
    c_q: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    key_valid: torch.Tensor | None


@dataclass
class Records:
    """What a caller asks the layers to record or replay, and what they recorded: one object
    per forward call, shared by the main and the MTP layers alike, every result keyed by layer
    index (MTP layer i is `num_hidden_layers + i`, as on disk). Results are stored by index,
    not appended, so re-running a layer (activation checkpointing) records once.

    Asks:
      record_routing       keep each MoE layer's chosen expert ids in `routing`;
      record_indices       keep each sparse layer's selected key slots in `indices` (int32: the
                           slots the attention used, replayed ones included);
      keep_indexer_inputs  keep each layer's `IndexerInputs` (dense layers too: the indexer
                           warm-up trains under dense attention);
      balance_alpha        weight of the sequence-wise balance loss (`balance_loss`), 0 = off;
      replay_routing       {layer: (B, T, top_k) expert ids} to use instead of routing;
      replay_indices       {layer: (B, T, K) key slots (any integer dtype, -1 = empty)} to attend
                           to instead of the indexer's top-k: a query whose row is all -1 selects
                           afresh (positions nobody recorded). Where a layer needs no selection
                           (every query may see all its keys, S <= topk) it attends densely, which
                           is what a recording at the same k holds. K may differ from the fresh
                           width; slots must lie in [0, S) or be -1 (not checked: no host sync).
    Results (always filled where they apply): `expert_load` {layer: (E,) token counts over
    real tokens}, and what was asked for."""

    record_routing: bool = False
    record_indices: bool = False
    keep_indexer_inputs: bool = False
    balance_alpha: float = 0.0
    replay_routing: dict[int, torch.Tensor] | None = None
    replay_indices: dict[int, torch.Tensor] | None = None
    routing: dict[int, torch.Tensor] = field(default_factory=dict)          # layer -> (B, T, top_k)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)          # layer -> (B, T, K) int32
    indexer_inputs: dict[int, IndexerInputs] = field(default_factory=dict)
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> (E,)
    balance_loss: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> 0-dim

    def __post_init__(self) -> None:
        if not self.balance_alpha >= 0:
            raise ValueError(f"balance_alpha must be >= 0, got {self.balance_alpha}")


@dataclass
class ForwardContext:
    """The per-call geometry every layer reads (internal to the model's forward): RoPE tables
    of the query positions, the key mask, the first query's slot, the attention options, the
    cache, and the caller's `Records`."""

    cos: torch.Tensor
    sin: torch.Tensor
    key_valid: torch.Tensor | None          # (B, S) bool over all key slots, None = all real
    q_start: int                            # slot of the first query (cache length before this call)
    attention: AttentionOptions
    cache: Any = None
    records: Records = field(default_factory=Records)

    def query_valid(self, T: int) -> torch.Tensor | None:
        if self.key_valid is None:
            return None
        return self.key_valid[:, self.q_start: self.q_start + T]


def call_geometry(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, cache: Any = None):
    """What a causal LM's forward derives from its inputs before any layer runs, for any model
    family: (q_start, new_valid, key_valid, position_ids). q_start is the cache length; new_valid
    (B, T) bool or None is the call's mask; key_valid (B, S) bool or None covers every key slot
    (the cache's past mask, then the call's); positions default to counting real tokens, so a
    left-padded row starts at 0. Raises ValueError for malformed shapes."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("input_ids is empty (sequence length 0)")
    dev = input_ids.device
    q_start = cache.length if cache is not None else 0
    new_valid = None if attention_mask is None else attention_mask.to(torch.bool)
    if new_valid is not None and new_valid.shape != (B, T):
        raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(new_valid.shape)}")
    past_valid = cache.key_valid if cache is not None else None
    key_valid = None
    if new_valid is not None or past_valid is not None:
        nv = new_valid if new_valid is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        pv = past_valid if past_valid is not None else torch.ones(B, q_start, dtype=torch.bool, device=dev)
        key_valid = torch.cat((pv, nv), dim=1)
    if position_ids is None:
        if key_valid is None:
            position_ids = torch.arange(q_start, q_start + T, device=dev).expand(B, T)
        else:
            position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
    return q_start, new_valid, key_valid, position_ids


def check_token_inputs(config: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the problem when token ids fall outside `config.vocab_size` or
    positions reach `config.max_position_embeddings`. Synchronises with the device, so callers
    run it once where inputs enter (generate, the trainer, the CLI), never per layer or step."""
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={config.vocab_size}), got range [{lo}, {hi}]")
    last = input_ids.shape[-1] - 1 if position_ids is None else int(position_ids.max())
    if last >= config.max_position_embeddings:
        raise ValueError(f"position {last} is beyond max_position_embeddings={config.max_position_embeddings}")
