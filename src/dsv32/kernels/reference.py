"""Plain-torch references for the kernels: small, obviously right, and slow.

Sparse attention (absorbed / MQA form, one latent KV head shared by all query heads):

    q        (B, T, H, C)    C = r_kv + d_r: the absorbed query [W_uk^T q_n ; q_r]
    kv       (B, S, C)       the latent cache [c_kv ; k_r]
    indices  (B, T, K)       selected key slots per query, -1 = empty slot
    out      (B, T, H, Dv)   Dv = r_kv: attention-weighted sum of c_kv
    lse      (B, T, H)       log-sum-exp of the scaled scores (-inf for a query with no keys)

Top-k selection by the lightning indexer (docs/math.md §4-5), one indexer key head shared by its heads:

    q        (B, T, H_I, d_I) indexer queries      w (B, T, H_I) head weights, scales folded in
    k        (B, S, d_I)      indexer keys         key_valid (B, >=S) bool, False at padding
    I(t, s) = sum_j w(t, j) * ReLU(q(t, j) . k(s)), over allowed s: s <= q_start + t, key_valid
    indices  (B, T, window + sink + min(topk, S)) int64 key slots, -1 = empty

These build the full (B, H, T, S) / (B, T, H_I, S) tensors; they exist to test the fast paths
(and `index_scores` is the differentiable score the DSA losses train).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def indices_to_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean (B, T, S) mask, True at the selected key slots (-1 entries ignored)."""
    B, T, K = indices.shape
    mask = torch.zeros(B, T, num_keys + 1, dtype=torch.bool, device=indices.device)
    slots = torch.where(indices >= 0, indices, num_keys)  # empty slots land in a spare column
    mask.scatter_(-1, slots.long(), True)
    return mask[..., :num_keys]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, T, H, Dk) over k (B, S, [H,] Dk), v (B, S, [H,] Dv) restricted to
    `mask` (B, T, S). A query with no allowed key gets output 0 and lse -inf. Float32 math."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if kf.dim() == 3:
        scores = torch.einsum("bthc,bsc->bhts", qf, kf)
    else:
        scores = torch.einsum("bthc,bshc->bhts", qf, kf)
    scores = scores * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    if vf.dim() == 3:
        out = torch.einsum("bhts,bsc->bthc", probs, vf)
    else:
        out = torch.einsum("bhts,bshc->bthc", probs, vf)
    return out, lse.transpose(1, 2)


def sparse_mla_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                         dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention, computed densely with a mask built from `indices`."""
    mask = indices_to_mask(indices, kv.shape[1])
    return masked_attention(q, kv, kv[..., :dv], mask, scale)


# ---------------------------------------------------------------------------------- selection
def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I(t, s) for q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I) -> (B, T, S) float32.
    Differentiable; builds (B, T, H_I, S), so call it on blocks of queries."""
    B, T, Hi, d = q.shape
    s = torch.matmul(q.reshape(B, T * Hi, d), k.transpose(1, 2)).view(B, T, Hi, -1)
    s = F.relu(s)
    return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)


def allowed_keys(num_keys: int, q_slots: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B or 1, T, S): causal by slot and not padding."""
    s = torch.arange(num_keys, device=q_slots.device)
    allowed = s[None, None, :] <= q_slots[None, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :num_keys]
    return allowed


def forced_slots(q_slots: torch.Tensor, key_valid: torch.Tensor | None, B: int, window: int,
                 sink: int) -> torch.Tensor:
    """Slots of the last `window` and first `sink` real tokens for each query, (B, T, window+sink),
    -1 where not allowed; a sink slot inside the window is dropped so no slot repeats."""
    device = q_slots.device
    T = q_slots.shape[0]
    parts = []
    if window:
        win = q_slots[:, None] - torch.arange(window, device=device)        # (T, w)
        parts.append(win.expand(B, T, window))
    if sink:
        first = (key_valid.long().argmax(dim=1) if key_valid is not None
                 else torch.zeros(B, dtype=torch.long, device=device))        # first real slot
        snk = first[:, None, None] + torch.arange(sink, device=device)       # (B, 1, sink)
        snk = snk.expand(B, T, sink)
        in_window = snk > (q_slots[None, :, None] - window)
        parts.append(torch.where(in_window, -1, snk))
    slots = torch.cat(parts, dim=-1)
    ok = (slots >= 0) & (slots <= q_slots[None, :, None])
    if key_valid is not None:
        ok = ok & torch.gather(key_valid, 1, slots.clamp(min=0).view(B, -1)).view_as(slots)
    return torch.where(ok, slots, -1)


@torch.no_grad()
def select_topk_reference(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int = 0,
                          key_valid: torch.Tensor | None = None, window: int = 0,
                          sink: int = 0) -> torch.Tensor:
    """Top-k selection from the full (B, T, S) score matrix: forced window/sink slots first, then
    the allowed keys by (score descending, slot ascending) -- a stable descending sort of the
    scores in slot order is exactly that order (-0.0 counts as 0.0)."""
    B, T, _, _ = q.shape
    S = k.shape[1]
    K = min(topk, S)
    q_slots = torch.arange(q_start, q_start + T, device=q.device)
    scores = index_scores(q.float(), w.float(), k.float())
    scores = torch.where(scores == 0, 0.0, scores)           # one zero: -0.0 sorts as 0.0 everywhere
    scores = scores.masked_fill(~allowed_keys(S, q_slots, key_valid), float("-inf"))
    out = [torch.full((B, T, K), -1, dtype=torch.long, device=q.device)]
    if window or sink:
        forced = forced_slots(q_slots, key_valid, B, window, sink)
        taken = torch.zeros(B, T, S + 1, dtype=torch.bool, device=q.device)
        taken.scatter_(-1, torch.where(forced >= 0, forced, S), True)
        scores = scores.masked_fill(taken[..., :S], float("-inf"))
        out.insert(0, forced)
    vals, order = scores.sort(dim=-1, descending=True, stable=True)
    out[-1] = torch.where(torch.isfinite(vals[..., :K]), order[..., :K], -1)
    return torch.cat(out, dim=-1)
