"""Turning a dense model into a sparse one (docs/math.md §8): the indexer losses of the two stages,
the recall metric, and the two training objectives.

Shape legend: B batch, T queries, S keys (training is self-attention, S = T), H main heads,
C = r_kv + d_r (one latent row [c_kv ; k_r]), H_I / d_I indexer heads / head dim, K selected
slots per query (-1 = empty slot).

Stage 1, warm-up: dense attention, only the indexers train.

    p(t, :) = (1/H) sum_h A_h(t, :)       A = the main attention probabilities; every row of
                                          A_h sums to 1, so this is the L1 normalisation
    L_I = mean_t KL( p(t, :) || softmax_s I(t, :) )   over allowed keys (causal, not padding)

Stage 2, sparse training: top-k on; the main model learns from the LM loss only, the indexer
from the KL restricted to the selected set S_t, both sides renormalised over S_t:

    p_S(t, :) = (1/H) sum_h softmax_{s in S_t} score_h(t, s)      (the sparse layer's own attention)
    L_I = mean_t KL( p_S(t, :) || softmax_{s in S_t} I(t, s) )

We average over real queries instead of the paper's sum over t, so the learning rate does not
depend on batch size and length (sum = mean x number of queries). The losses of all layers
are summed (each layer's indexer only sees its own).

Memory: targets and index scores are computed one chunk of queries at a time, so nothing of
size H x T x S (or B x T x S) is ever held, however long the sequence. Each chunk's gradient
with respect to the indexer's queries, head weights and keys is taken while the chunk is in
hand and applied in the backward pass (`_ChunkedLoss`); backward never recomputes a target.
The main model's side is detached: targets come from `torch.no_grad` projections of detached
layer inputs, so the indexer loss never reaches the main model, and the model's forward runs
the indexer under no_grad, so the LM loss never reaches the indexer.

MTP layers: when the model has them, both stages also run them (dense in the warm-up, sparse in
stage 2) and train their indexers the same way, on the sequence shifted by the layer's depth;
their LM loss counts only with `mtp_weight > 0`. Left out: any special treatment of the
optional window/sink slots of docs/math.md §5, which count as selected like any other slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import AttentionOptions, DSV32ForCausalLM, IndexerInputs, Records
from ..model.attention import MLA
from ..kernels import allowed_keys, index_scores
from .objectives import StepResult, language_model_terms, trained_tokens, unpack_batch

Metrics = dict[str, torch.Tensor]
_CHUNK_BUDGET_BYTES = 4 * 2**20      # float32 (B, chunk, max(H, H_I), S or K) per chunk of queries;
                                     # small chunks stay in cache: 3x faster than 64 MB at T=2K on CPU


# ------------------------------------------------------------------------------- pieces
@torch.no_grad()
def attention_queries(mla: MLA, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The main attention of one layer in absorbed form, float32 and without gradient:
    queries q (B, T, H, C) = [W_uk^T q_n ; q_r] and keys kv (B, T, C) = [c_kv ; k_r], so that
    score_h(t, s) = q[t, h] . kv[s] * mla.scale. x (B, T, D) is the layer's normed input.
    Another attention layout (the dense GQA retrofit, model/gqa.py) states its own `mqa_form`."""
    if hasattr(mla, "mqa_form"):
        return mla.mqa_form(x, cos, sin)
    _, q_n, q_r, latent = mla.project(x, cos, sin)
    w_uk, _ = mla.absorbed_weights()
    q_abs = torch.einsum("bthd,hdr->bthr", q_n.float(), w_uk.float())
    return torch.cat((q_abs, q_r.float()), dim=-1), latent.float()


def dense_attention_target(q: torch.Tensor, kv: torch.Tensor, scale: float,
                           allowed: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities p (B, n, S) of queries q (B, n, H, C) over keys
    kv (B, S, C) restricted to `allowed` (B or 1, n, S); every row needs one allowed key."""
    scores = torch.einsum("bthc,bsc->bths", q, kv) * scale
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=2)


def kl_to_logits(p: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per row over the `allowed` entries: p and logits (B, n, S),
    allowed broadcastable to them, p zero outside `allowed`. Returns (B, n)."""
    log_q = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    log_q = log_q.masked_fill(~allowed, 0.0)        # p is 0 there; keeps 0 * -inf out of the sum
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1)


def _chunk_size(B: int, width: int, heads: int, budget: int | None) -> int:
    return max(1, (budget or _CHUNK_BUDGET_BYTES) // max(1, 4 * B * width * heads))


def _query_weights(key_valid: torch.Tensor | None, t0: int, t1: int, B: int, device) -> torch.Tensor:
    if key_valid is None:
        return torch.ones(B, t1 - t0, device=device)
    return key_valid[:, t0:t1].float()


class _ChunkedLoss(torch.autograd.Function):
    """sum over query chunks [t0, t1) of `chunk_loss(t0, t1, iq[:, t0:t1], iw[:, t0:t1], ik[:, :t1])`.

    With `need_grad`, each chunk's gradients with respect to its slices of iq (B, T, H_I, d_I),
    iw (B, T, H_I) and ik (B, S, d_I) are computed in the forward pass, while the chunk's
    scores exist, and only scaled and returned by backward: one pass over the chunks, memory
    linear in T. Not twice differentiable."""

    @staticmethod
    def forward(ctx, chunk_loss: Callable, bounds: list[tuple[int, int]], need_grad: bool,
                iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=iq.device)
        grads = [torch.zeros_like(t) for t in (iq, iw, ik)] if need_grad else None
        for t0, t1 in bounds:
            parts = (iq[:, t0:t1], iw[:, t0:t1], ik[:, :t1])
            if not need_grad:
                total += chunk_loss(t0, t1, *parts)
                continue
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_() for p in parts]
                value = chunk_loss(t0, t1, *leaves)
                chunk_grads = torch.autograd.grad(value, leaves)
            for dest, g, sl in zip(grads, chunk_grads, (slice(t0, t1), slice(t0, t1), slice(0, t1))):
                dest[:, sl] += g
            total += value.detach()
        if need_grad:
            ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g_q, g_w, g_k = ctx.saved_tensors
        return None, None, None, g_q * grad_out, g_w * grad_out, g_k * grad_out


def _run_chunks(chunk_loss: Callable, T: int, chunk: int, iq: torch.Tensor, iw: torch.Tensor,
                ik: torch.Tensor) -> torch.Tensor:
    bounds = [(t0, min(T, t0 + chunk)) for t0 in range(0, T, chunk)]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (iq, iw, ik))
    return _ChunkedLoss.apply(chunk_loss, bounds, need_grad, iq, iw, ik)


# ------------------------------------------------------------------------------- stage 1
def indexer_warmup_loss(q: torch.Tensor, kv: torch.Tensor, scale: float, iq: torch.Tensor,
                        iw: torch.Tensor, ik: torch.Tensor, key_valid: torch.Tensor | None = None, *,
                        chunk_budget_bytes: int | None = None) -> tuple[torch.Tensor, Metrics]:
    """Stage-1 loss of one layer: mean over real queries of KL(p(t,:) || softmax_s I(t,:)).

    q (B, T, H, C), kv (B, T, C): the main attention (`attention_queries`), no gradient.
    iq (B, T, H_I, d_I), iw (B, T, H_I), ik (B, T, d_I): the indexer's queries, head weights
    and keys (`Indexer.queries` / `Indexer.keys`); the loss is differentiable in these.
    key_valid (B, T) bool, False = padding (neither key nor counted query).
    Returns the loss (0-dim) and {"indexer_kl"}."""
    B, T, H, _ = q.shape
    chunk = _chunk_size(B, T, max(H, iq.shape[2]), chunk_budget_bytes)

    def chunk_loss(t0: int, t1: int, iq_c, iw_c, ik_c) -> torch.Tensor:
        allowed = allowed_keys(t1, torch.arange(t0, t1, device=q.device), key_valid)
        allowed = allowed | ~allowed.any(-1, keepdim=True)   # padding queries: any row; weight 0
        with torch.no_grad():
            p = dense_attention_target(q[:, t0:t1], kv[:, :t1], scale, allowed)
        kl = kl_to_logits(p, index_scores(iq_c, iw_c, ik_c), allowed)
        return (kl * _query_weights(key_valid, t0, t1, B, q.device)).sum()

    total = _run_chunks(chunk_loss, T, chunk, iq, iw, ik)
    n = float(B * T) if key_valid is None else key_valid.sum().clamp(min=1).float()
    loss = total / n
    return loss, {"indexer_kl": loss.detach()}


# ------------------------------------------------------------------------------- stage 2
def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of t (B, S, E) at slots idx (B, n, K) (clamped >= 0) -> (B, n, K, E). One
    index_select over the flattened rows: 5x faster on CPU than gather with an expanded index."""
    B, n, K = idx.shape
    S, E = t.shape[1], t.shape[2]
    flat = (idx.clamp(min=0) + S * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    return t.reshape(B * S, E).index_select(0, flat).view(B, n, K, E)


def indexer_sparse_loss(q: torch.Tensor, kv: torch.Tensor, scale: float, iq: torch.Tensor,
                        iw: torch.Tensor, ik: torch.Tensor, indices: torch.Tensor,
                        key_valid: torch.Tensor | None = None, *,
                        chunk_budget_bytes: int | None = None) -> tuple[torch.Tensor, Metrics]:
    """Stage-2 loss of one layer: mean over real queries of KL(p_S(t,:) || softmax_{S_t} I(t,:)).

    Shapes as in `indexer_warmup_loss`, plus indices (B, T, K): the selected key slots S_t
    (-1 = empty). Memory and compute are O(T K), never O(T S). Returns the loss and
    {"indexer_kl_selected"}."""
    B, T, H, _ = q.shape
    K = indices.shape[-1]
    chunk = _chunk_size(B, K, max(H, iq.shape[2], iq.shape[3], kv.shape[-1]), chunk_budget_bytes)

    def chunk_loss(t0: int, t1: int, iq_c, iw_c, ik_c) -> torch.Tensor:
        idx = indices[:, t0:t1]
        sel = idx >= 0
        sel = sel | ~sel.any(-1, keepdim=True)              # queries with nothing selected: weight 0
        with torch.no_grad():
            rows = _gather_rows(kv, idx)                                         # (B, n, K, C)
            scores = torch.einsum("bthc,btkc->bthk", q[:, t0:t1], rows) * scale
            p = torch.softmax(scores.masked_fill(~sel[:, :, None], float("-inf")), dim=-1).mean(2)
        keys = _gather_rows(ik_c, idx)                                           # (B, n, K, d_I)
        relu = torch.relu(torch.einsum("bthd,btkd->bthk", iq_c, keys))           # (B, n, H_I, K)
        logits = torch.einsum("bth,bthk->btk", iw_c, relu)
        kl = kl_to_logits(p, logits, sel)
        weights = _query_weights(key_valid, t0, t1, B, q.device) * (idx >= 0).any(-1).float()
        return (kl * weights).sum()

    total = _run_chunks(chunk_loss, T, chunk, iq, iw, ik)
    n = float(B * T) if key_valid is None else key_valid.sum().clamp(min=1).float()
    loss = total / n
    return loss, {"indexer_kl_selected": loss.detach()}


# ------------------------------------------------------------------------------- recall
@torch.no_grad()
def selected_mass(q: torch.Tensor, kv: torch.Tensor, scale: float, indices: torch.Tensor,
                  key_valid: torch.Tensor | None = None, *,
                  chunk_budget_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The share of each query's dense attention mass (head-averaged, over all allowed keys)
    that falls inside its selected set, and the most that any set of that many keys could
    hold (the mass of the top-K keys of the dense attention itself: recall's ceiling).

    q (B, T, H, C), kv (B, T, C), indices (B, T, K) -> two (B, T) in [0, 1]; padding queries
    get 0. Computed in chunks of queries."""
    B, T, H, _ = q.shape
    K = indices.shape[-1]
    chunk = _chunk_size(B, T, H, chunk_budget_bytes)
    captured = torch.zeros(B, T, device=q.device)
    ceiling = torch.zeros(B, T, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        allowed = allowed_keys(t1, torch.arange(t0, t1, device=q.device), key_valid)
        real = allowed.any(-1)
        p = dense_attention_target(q[:, t0:t1], kv[:, :t1], scale, allowed | ~real[..., None])
        idx = indices[:, t0:t1]
        captured[:, t0:t1] = (p.gather(-1, idx.clamp(min=0)) * (idx >= 0)).sum(-1) * real
        ceiling[:, t0:t1] = p.topk(min(K, t1), dim=-1).values.sum(-1) * real
    return captured, ceiling


@dataclass
class SelectionReport:
    """Per layer: the selected slots (B, T, K), the dense attention mass they capture (B, T),
    and the most any K keys could capture (B, T)."""
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    ceiling: dict[int, torch.Tensor] = field(default_factory=dict)
    query_valid: torch.Tensor | None = None         # (B, T) bool, None = all real

    def recall(self, topk: int | None = None) -> dict[str, float]:
        """Mean captured mass over real queries and layers ("indexer_recall") and its ceiling
        ("indexer_recall_ceiling"); with `topk`, also over the queries that have more than
        `topk` allowed keys only ("indexer_recall_past_k"), where selection drops keys."""
        out: dict[str, float] = {}
        layers = sorted(self.mass)
        stacked = torch.stack([self.mass[i] for i in layers])                    # (L, B, T)
        valid = torch.ones_like(stacked[0], dtype=torch.bool) if self.query_valid is None else self.query_valid
        out["indexer_recall"] = float(stacked[:, valid].mean())
        out["indexer_recall_ceiling"] = float(torch.stack([self.ceiling[i] for i in layers])[:, valid].mean())
        for i in layers:
            out[f"indexer_recall/layer{i}"] = float(self.mass[i][valid].mean())
            out[f"indexer_recall_ceiling/layer{i}"] = float(self.ceiling[i][valid].mean())
        if topk is not None:
            n_allowed = valid.long().cumsum(1)                                   # keys a query may see
            past = valid & (n_allowed > topk)
            if past.any():
                out["indexer_recall_past_k"] = float(stacked[:, past].mean())
        return out


@torch.no_grad()
def selection_report(model: DSV32ForCausalLM, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, *,
                     attention: AttentionOptions) -> SelectionReport:
    """Run `model` on input_ids (B, T) with `attention` and, for every layer, the indexer's own
    top-k selection (`Indexer.select` with `attention`'s topk and backend, as the sparse layer
    uses it) on that layer's actual input, and the share of the layer's dense attention mass it
    captures. With dense attention
    this is what switching selection on would keep; with sparse attention, what it keeps."""
    out = model(input_ids, attention_mask, attention=attention, records=Records(keep_indexer_inputs=True),
                logits_to_keep=1)
    kept_all = out.records.indexer_inputs
    report = SelectionReport(query_valid=next(iter(kept_all.values())).key_valid)   # the main layers' key mask
    for block in model.model.layers:
        i = block.layer_idx
        if i in kept_all:                 # a layer kept dense (no indexer) has nothing to report
            report.indices[i], report.mass[i], report.ceiling[i] = block.run_on_attention(_layer_selection,
                                                                                          kept_all[i], attention)
    return report


def _layer_selection(mla: MLA, kept: IndexerInputs, attention: AttentionOptions):
    q, kv, iq, iw, ik = _indexer_parts(mla, kept)
    idx = mla.indexer.select(iq, iw, ik, 0, kept.key_valid, attention.backend, attention.topk)
    return (idx, *selected_mass(q, kv, mla.scale, idx, kept.key_valid))


# ------------------------------------------------------------------------------- objectives
def _indexed_blocks(model: DSV32ForCausalLM, records: Records):
    """(layer index, block, kept inputs) of every layer, main then MTP, whose indexer inputs the
    forward kept; the kept inputs carry the layer's RoPE tables and key mask (an MTP layer's are
    shifted by its depth)."""
    for block in [*model.model.layers, *model.mtp]:
        if block.layer_idx in records.indexer_inputs:
            yield block.layer_idx, block, records.indexer_inputs[block.layer_idx]


def _indexer_parts(mla: MLA, kept: IndexerInputs):
    iq, iw = mla.indexer.queries(kept.x, kept.c_q, kept.cos, kept.sin)
    ik = mla.indexer.keys(kept.x, kept.cos, kept.sin)
    q, kv = attention_queries(mla, kept.x, kept.cos, kept.sin)
    return q, kv, iq, iw, ik


def _warmup_term(mla: MLA, kept: IndexerInputs) -> torch.Tensor:
    q, kv, iq, iw, ik = _indexer_parts(mla, kept)
    return indexer_warmup_loss(q, kv, mla.scale, iq, iw, ik, kept.key_valid)[0]


def _sparse_term(mla: MLA, kept: IndexerInputs, indices: torch.Tensor) -> torch.Tensor:
    q, kv, iq, iw, ik = _indexer_parts(mla, kept)
    return indexer_sparse_loss(q, kv, mla.scale, iq, iw, ik, indices, kept.key_valid)[0]


class IndexerWarmup:
    """Stage 1: the main model runs dense attention under no_grad; only `*.indexer.*`
    parameters train, on the sum over layers of `indexer_warmup_loss`. The router bias is
    left alone (the main model, its router included, is frozen)."""

    name = "indexer_warmup"
    updates_router_bias = False

    def settings(self) -> dict:
        return {"objective": self.name}

    @staticmethod
    def trainable(name: str) -> bool:
        return ".indexer." in name

    def __call__(self, model: DSV32ForCausalLM, batch) -> StepResult:
        input_ids, _, mask = unpack_batch(batch)       # every query trains the indexer, labelled or not
        with torch.no_grad():
            out = model(input_ids, mask, attention=AttentionOptions(sparse=False),
                        records=Records(keep_indexer_inputs=True), logits_to_keep=1,
                        compute_mtp=len(model.mtp) > 0)
        total = torch.zeros((), device=input_ids.device)
        metrics: Metrics = {}
        for i, block, kept in _indexed_blocks(model, out.records):
            loss = block.run_on_attention(_warmup_term, kept)
            total = total + loss
            metrics[f"indexer_kl/layer{i}"] = loss.detach()
        metrics["indexer_kl"] = total.detach()
        return StepResult(loss=total, metrics=metrics, expert_load=out.expert_load,
                          tokens=input_ids.numel())


class SparseTraining:
    """Stage 2: sparse attention (top-k on). The main model learns from the LM loss (plus the
    optional sequence-balance and MTP losses); each layer's indexer from `indexer_sparse_loss`
    on its own selection, with `indexer_weight`. The two gradients touch disjoint parameters."""

    name = "sparse_training"
    updates_router_bias = True

    def __init__(self, *, indexer_weight: float = 1.0, balance_alpha: float = 0.0, mtp_weight: float = 0.0,
                 backend: str = "auto") -> None:
        for key, value in (("indexer_weight", indexer_weight), ("balance_alpha", balance_alpha),
                           ("mtp_weight", mtp_weight)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        self.indexer_weight, self.balance_alpha, self.mtp_weight = indexer_weight, balance_alpha, mtp_weight
        self.attention = AttentionOptions(sparse=True, backend=backend)

    def settings(self) -> dict:
        return {"objective": self.name, "indexer_weight": self.indexer_weight,
                "balance_alpha": self.balance_alpha, "mtp_weight": self.mtp_weight}

    @staticmethod
    def trainable(name: str) -> bool:
        return True

    def __call__(self, model: DSV32ForCausalLM, batch) -> StepResult:
        input_ids, labels, mask = unpack_batch(batch)
        records = Records(keep_indexer_inputs=True, record_indices=True, balance_alpha=self.balance_alpha)
        out = model(input_ids, mask, attention=self.attention, records=records,
                    compute_mtp=self.mtp_weight > 0 or len(model.mtp) > 0)
        loss, metrics = language_model_terms(out, labels, self.mtp_weight, mask)
        kl_total = torch.zeros((), device=input_ids.device)
        for i, block, kept in _indexed_blocks(model, records):
            if i in records.indices:
                kl_total = kl_total + block.run_on_attention(_sparse_term, kept, records.indices[i])
        metrics["indexer_kl_selected"] = kl_total.detach()
        return StepResult(loss=loss + self.indexer_weight * kl_total, metrics=metrics,
                          expert_load=out.expert_load, tokens=trained_tokens(input_ids, labels, metrics["tokens"]))
