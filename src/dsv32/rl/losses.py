"""The GRPO objective with the V3.2 stabilisers, as small pure functions (docs/math.md §10).

Shape legend: B sequences (G per prompt, all prompts together), T positions. Every per-token
input is (B, T) and aligned: logp[i, t] is log pi_theta of the token at position t of o_i
(computed by `dsv32.rl.logprobs.token_logprobs`, over the kept set when the sampler truncated),
logp_old the sampler's own log-prob of it, logp_ref the reference policy's, and mask[i, t] is
1 where position t belongs to the output o_i (not the prompt, not padding).

    r(i,t) = pi_theta / pi_old
    J = 1/G sum_i 1/|o_i| sum_t [ M_i * min(r A_i, clip(r, 1-eps_lo, 1+eps_hi) A_i) - beta * KL(i,t) ]

    clipped_surrogate    per-token min(r A, clip(r) A) and clip statistics
    kl_penalty           per-token KL(i,t): "unbiased" (eq. 7, r * k3, r differentiable), "k3", "none"
    off_policy_mask      M_i (eq. 8-9): drop negative-advantage sequences that drifted > delta
    aggregate            "sequence_mean" (the paper's 1/G sum_i 1/|o_i| sum_t) or "token_mean"
    grpo_loss            -J composed from the above, with metrics

Every function returns detached 0-dim tensors as metrics (no host syncs: the caller decides
when to call `.item()`). Inputs that are data (logp_old, logp_ref, advantages) are detached
here, so a caller cannot leak gradient into them by accident.

Left out on purpose: rewards and advantages (dsv32.rl.advantages), log-prob computation
(dsv32.rl.logprobs), the rollout and optimiser loop (the trainer composes these functions);
other aggregations (e.g. Dr. GRPO's constant normaliser) and dual-clip PPO, which V3.2 does
not use.
"""

from __future__ import annotations

import torch

from .logprobs import token_entropy

Metrics = dict[str, torch.Tensor]

KL_ESTIMATORS = ("unbiased", "k3", "none")
AGGREGATIONS = ("sequence_mean", "token_mean")
_ENTROPY_CHUNK_BYTES = 64 * 2**20   # float32 (C, V) temporaries of the entropy metric


def _check_bt(mask: torch.Tensor, advantages: torch.Tensor | None = None, **per_token: torch.Tensor) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must be (B, T), got {tuple(mask.shape)}")
    for name, t in per_token.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} must be (B, T) = {tuple(mask.shape)} like mask, got {tuple(t.shape)}")
    if advantages is not None and advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({mask.shape[0]},), got {tuple(advantages.shape)}")


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)


def _log_ratio(logp: torch.Tensor, logp_old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log pi_theta - log pi_old, 0 outside the mask: padding may hold anything (even -inf), and
    exp of it must neither overflow nor send NaN gradients back through a discarded branch."""
    return torch.where(valid, logp - logp_old.detach(), 0)


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate per token: min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    logp, logp_old, mask: (B, T); advantages: (B,), one per sequence. eps_low, eps_high in (0, 1).
    Returns the per-token objective (B, T) to maximise (0 outside the mask) and metrics:
    `clip_frac_low` / `clip_frac_high` (fraction of valid tokens where the clipped branch wins
    and stops the gradient: r < 1-eps_low with A < 0, r > 1+eps_high with A > 0), `clip_frac`
    (their sum), `ratio_mean`, `ratio_max`, `ratio_min` over valid tokens.
    """
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not 0 < eps < 1:
            raise ValueError(f"{name} must be in (0, 1), got {eps}")
    _check_bt(mask, advantages, logp=logp, logp_old=logp_old)
    valid = mask.bool()
    ratio = _log_ratio(logp, logp_old, valid).exp()                          # (B, T)
    adv = advantages.detach().to(ratio.dtype)[:, None]                       # (B, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    surrogate = torch.where(valid, surrogate, 0)

    r = ratio.detach()
    low = valid & (r < 1 - eps_low) & (adv < 0)
    high = valid & (r > 1 + eps_high) & (adv > 0)
    n = valid.sum().clamp(min=1)
    metrics = {
        "clip_frac_low": low.sum() / n,
        "clip_frac_high": high.sum() / n,
        "clip_frac": (low | high).sum() / n,
        "ratio_mean": _masked_mean(r, valid),
        "ratio_max": r.masked_fill(~valid, -torch.inf).amax(),
        "ratio_min": r.masked_fill(~valid, torch.inf).amin(),
    }
    return surrogate, metrics


def kl_penalty(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    mask: torch.Tensor,
    estimator: str = "unbiased",
) -> tuple[torch.Tensor, Metrics]:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_old.

    With x = log(pi_ref / pi_theta) and k3 = e^x - x - 1 (>= 0):
      "unbiased": r * k3 with r = pi_theta / pi_old DIFFERENTIABLE (V3.2 eq. 7). Since
          E_{pi_old}[r f] = E_{pi_theta}[f] and E_{pi_theta}[k3] = KL(pi_theta || pi_ref), both
          the value and the gradient are unbiased even when pi_old != pi_theta;
      "k3": k3 alone, the biased baseline (its gradient is wrong off-policy, and even on-policy
          it is the gradient of the reverse KL);
      "none": zeros, no KL term.
    logp, logp_old, logp_ref, mask: (B, T) (logp_ref may be None for "none").
    Returns per-token KL (B, T), 0 outside the mask, and metrics `kl_mean` (valid-token mean;
    absent for "none").
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if estimator == "none":
        return torch.zeros_like(logp), {}
    if logp_ref is None:
        raise ValueError(f"logp_ref is required for the {estimator!r} KL estimator")
    _check_bt(mask, logp=logp, logp_old=logp_old, logp_ref=logp_ref)
    valid = mask.bool()
    x = torch.where(valid, logp_ref.detach() - logp, 0)
    k3 = torch.expm1(x) - x                   # expm1: no cancellation when pi_theta ~ pi_ref
    kl = k3 if estimator == "k3" else _log_ratio(logp, logp_old, valid).exp() * k3
    kl = torch.where(valid, kl, 0)
    return kl, {"kl_mean": _masked_mean(kl.detach(), valid)}


def off_policy_mask(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
) -> tuple[torch.Tensor, Metrics]:
    """Off-policy sequence mask M (V3.2 eq. 8-9):

        M_i = 0  if  A_i < 0  and  1/|o_i| sum_t log(pi_old / pi_theta) > delta ;  else 1

    Negative-advantage sequences that the current policy has drifted far from are the ones
    whose updates destabilise training; positive ones are kept whatever their drift.
    logp, logp_old, mask: (B, T); advantages: (B,); delta > 0. The statistic is a constant
    (computed without gradient): M selects sequences, it is not optimised.
    Returns M (B,) in logp's dtype and metrics `masked_frac` (fraction of sequences with
    M = 0) and `kl_old_theta` (the statistic's mean over sequences: a k1 estimate of
    KL(pi_old || pi_theta) per token).
    """
    if not delta > 0:
        raise ValueError(f"delta must be > 0 (the off-policy threshold; pass delta=None to grpo_loss to disable), got {delta}")
    _check_bt(mask, advantages, logp=logp, logp_old=logp_old)
    with torch.no_grad():
        valid = mask.bool()
        length = valid.sum(dim=-1).clamp(min=1)                               # (B,)
        divergence = -_log_ratio(logp, logp_old, valid).sum(dim=-1) / length  # (B,)
        drop = (advantages < 0) & (divergence > delta)
    return (~drop).to(logp.dtype), {"masked_frac": drop.float().mean(), "kl_old_theta": divergence.mean()}


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "sequence_mean") -> torch.Tensor:
    """Reduce per-token values (B, T) over valid tokens to a scalar.

    "sequence_mean": mean over sequences of each sequence's token mean, 1/B sum_i 1/|o_i| sum_t
        (the paper's; every sequence weighs the same whatever its length; B counts sequences
        with no valid token, which contribute 0);
    "token_mean": sum over all valid tokens / their number (long sequences weigh more).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    _check_bt(mask, values=values)
    valid = mask.bool()
    values = torch.where(valid, values, 0)
    if mode == "token_mean":
        return values.sum() / valid.sum().clamp(min=1)
    return (values.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)).mean()


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    logp_ref: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "unbiased",
    delta: float | None = None,
    aggregation: str = "sequence_mean",
    logits: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The GRPO loss -J (docs/math.md §10) to minimise, with every stabiliser switchable.

    logp (B, T): log pi_theta, differentiable; logp_old (B, T): the sampler's log-probs;
    advantages (B,); mask (B, T) marks output tokens; logp_ref (B, T): the reference policy,
    needed when beta > 0 and kl_estimator != "none" (given with beta = 0, the KL is only
    reported). eps_low / eps_high: clip range. kl_estimator: "unbiased" | "k3" | "none".
    delta: off-policy mask threshold, None to keep every sequence. aggregation:
    "sequence_mean" | "token_mean". logits (B, T, V) and kept (as in `token_logprobs`): only
    for the `entropy` metric; they get no gradient.

    Returns the scalar loss and metrics: `loss`, `pg_objective` (the surrogate part of J),
    `clip_frac[_low|_high]`, `ratio_mean|max|min`, `masked_frac`, `kl_old_theta` (with
    delta), `kl_mean` (with logp_ref and an estimator), `entropy` (with logits).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and kl_estimator != "none" and logp_ref is None:
        raise ValueError(f"beta={beta} with kl_estimator={kl_estimator!r} needs logp_ref")

    surrogate, metrics = clipped_surrogate(logp, logp_old, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    if delta is None:
        metrics["masked_frac"] = torch.zeros((), device=logp.device)
    else:
        keep, mask_metrics = off_policy_mask(logp, logp_old, advantages, mask, delta)
        surrogate = surrogate * keep[:, None]
        metrics.update(mask_metrics)
    metrics["pg_objective"] = aggregate(surrogate.detach(), mask, aggregation)

    objective = surrogate
    if kl_estimator != "none" and logp_ref is not None:
        kl, kl_metrics = kl_penalty(logp, logp_old, logp_ref, mask, kl_estimator)
        metrics.update(kl_metrics)
        if beta > 0:
            objective = objective - beta * kl
    loss = -aggregate(objective, mask, aggregation)
    metrics["loss"] = loss.detach()

    if logits is not None:
        chunk = max(1, _ENTROPY_CHUNK_BYTES // (4 * logits.shape[-1]))
        metrics["entropy"] = _masked_mean(token_entropy(logits, kept, chunk_size=chunk), mask.bool())
    return loss, metrics
