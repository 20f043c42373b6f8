"""Token log-probabilities and entropies, optionally restricted to a kept token set (docs/math.md §10,
"keep sampling mask").

Shape legend: B sequences, T positions, V vocabulary, K the most tokens kept at one position,
N = B*T flattened positions.

When the sampler truncates its distribution (top-k / top-p), the sampled token came from the
renormalised distribution over the kept set. Computing pi_theta (and pi_ref) over the same set

    log pi(y_t) = z_t[y_t] - logsumexp_{v in kept_t} z_t[v]

makes all three policies share one action space, so the ratios and the KL compare like with like.

A kept set is given in one of two forms:

* boolean (B, T, V): True where a token is kept;
* compact (B, T, K) int64 (or int32) token ids, padded with -1 — what the sampler records (K << V).
  Ids must be unique within a position.

A position whose kept set is empty (typically prompt or padding positions, for which the sampler
recorded nothing) means "no truncation": it uses the full vocabulary. A target outside a
non-empty kept set has probability zero: its log-prob is -inf (the sampler never produces one).

Two paths compute the same thing:

* ``chunk_size=None`` — the plain-torch reference: a few (B, T, V) float temporaries;
* ``chunk_size=C``    — rows processed C positions at a time in a custom autograd function that
  saves only logsumexp per position and recomputes the softmax chunk by chunk in backward; the
  only (B, T, V) float tensor it ever makes is the gradient of the logits itself. Use it for
  real vocabularies (V ~ 130K).

Left out on purpose: fused cross-entropy with the LM head (computing logits chunk by chunk from
hidden states) — a kernel concern for a later GPU backend; and entropy gradients: V3.2's
objective has no entropy bonus, so entropy here is a detached diagnostic.
"""

from __future__ import annotations

import torch


def kept_ids_to_mask(kept_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Compact kept set (..., K) of ids padded with -1 -> boolean mask (..., V)."""
    # Padding goes to an extra column V that is then dropped: scattering it onto a real id
    # (e.g. after clamping -1 to 0) would race with a genuine entry for that id.
    idx = torch.where(kept_ids < 0, vocab_size, kept_ids).long()
    mask = torch.zeros(*kept_ids.shape[:-1], vocab_size + 1, dtype=torch.bool, device=kept_ids.device)
    return mask.scatter_(-1, idx, True)[..., :vocab_size]


def _as_mask(kept: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Either kept form (..., V) bool | (..., K) ids -> bool (..., V), empty rows meaning 'all kept'."""
    mask = kept if kept.dtype == torch.bool else kept_ids_to_mask(kept, vocab_size)
    return mask | ~mask.any(dim=-1, keepdim=True)


def _check_inputs(logits: torch.Tensor, kept: torch.Tensor | None, chunk_size: int | None) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if kept is None:
        return
    if kept.dtype == torch.bool:
        if kept.shape != logits.shape:
            raise ValueError(f"a boolean kept mask must be (B, T, V) = {tuple(logits.shape)}, got {tuple(kept.shape)}")
    elif kept.dtype in (torch.int64, torch.int32):
        if kept.ndim != 3 or kept.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"compact kept ids must be (B, T, K) with (B, T) = {tuple(logits.shape[:2])}, got {tuple(kept.shape)}")
    else:
        raise TypeError(f"kept must be a bool (B, T, V) mask or int (B, T, K) ids padded with -1, got dtype {kept.dtype}")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 at least: half-precision logsumexp over a large vocabulary loses too much."""
    return torch.promote_types(logits.dtype, torch.float32)


def _kept_logits(z: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (C, V) -> logits in the compute dtype with the tokens outside the kept set at
    -inf, and the kept mask (C, V) (None for the full vocabulary). Never writes into `z`."""
    z = z.to(_compute_dtype(z))
    if kept is None:
        return z, None
    mask = _as_mask(kept, z.shape[-1])
    return z.masked_fill(~mask, -torch.inf), mask


class _ChunkedKeptLogProb(torch.autograd.Function):
    """logits (N, V), targets (N,), kept (N, V) bool | (N, K) ids | None -> log-probs (N,).

    Saves the inputs by reference and lse (N,); backward rebuilds the softmax one chunk at a
    time: d logp / d z = onehot(y) [if y is kept] - p_kept."""

    @staticmethod
    def forward(ctx, logits, targets, kept, chunk_size):
        lse = torch.empty(logits.shape[0], dtype=_compute_dtype(logits), device=logits.device)
        out = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk_size):
            rows = slice(s, s + chunk_size)
            z, _ = _kept_logits(logits[rows], None if kept is None else kept[rows])       # (C, V)
            lse[rows] = z.logsumexp(dim=-1)
            out[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, kept, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, kept, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(s, s + ctx.chunk_size)
            z, mask = _kept_logits(logits[rows], None if kept is None else kept[rows])    # (C, V)
            y, g = targets[rows, None], grad_out[rows, None].to(z.dtype)                   # (C, 1)
            p = (z - lse[rows, None]).exp_()                                               # 0 off the kept set
            # A target outside its kept set gets no onehot term (its logit was masked out).
            hit = g if mask is None else g * mask.gather(-1, y)
            grad[rows] = p.mul_(-g).scatter_add_(-1, y, hit).to(grad.dtype)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kept: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log pi(targets) from logits, renormalised over the kept set when one is given.

    logits: (B, T, V), any float dtype (computed in float32, or float64 for float64 logits).
    targets: (B, T) int64 token ids, valid ids everywhere (use the pad id at padding).
    kept: None (full vocabulary), bool (B, T, V), or int (B, T, K) ids padded with -1.
    chunk_size: None for the plain reference; C for the memory-friendly path (C positions at
        a time). Both give the same values and gradients.

    Returns (B, T) log-probs in the compute dtype, differentiable with respect to `logits`.
    """
    _check_inputs(logits, kept, chunk_size)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be (B, T) = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    if chunk_size is None:
        z, _ = _kept_logits(logits, kept)
        return z.log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    B, T, V = logits.shape
    flat_kept = None if kept is None else kept.reshape(B * T, kept.shape[-1])
    out = _ChunkedKeptLogProb.apply(logits.reshape(B * T, V), targets.reshape(B * T), flat_kept, chunk_size)
    return out.view(B, T)


@torch.no_grad()
def token_entropy(
    logits: torch.Tensor,
    kept: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy -sum_v p(v) log p(v) of the policy at each position, over the kept set (same
    conventions as `token_logprobs`) or the full vocabulary.

    logits: (B, T, V); kept: None | bool (B, T, V) | int (B, T, K). chunk_size: None to do all
    positions at once, C to bound the float temporaries to (C, V).
    Returns (B, T) in the compute dtype (float32 or float64), detached (a diagnostic: V3.2
    has no entropy bonus).
    """
    _check_inputs(logits, kept, chunk_size)
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    flat_kept = None if kept is None else kept.reshape(B * T, kept.shape[-1])
    step = chunk_size or max(B * T, 1)
    out = torch.empty(B * T, dtype=_compute_dtype(logits), device=logits.device)
    for s in range(0, B * T, step):
        rows = slice(s, s + step)
        z, _ = _kept_logits(flat[rows], None if flat_kept is None else flat_kept[rows])
        # entr(0) = 0: tokens outside the kept set (p = 0 exactly) add nothing, and no 0 * -inf.
        out[rows] = torch.special.entr(z.softmax(dim=-1)).sum(dim=-1)
    return out.view(B, T)
