"""The GRPO objective's pieces against hand-computed values on tiny tensors, their gradients
(clipping side, masked sequences, the unbiased KL's ratio), grpo_loss against a naive
per-element implementation under every switch, bad inputs, and a Monte-Carlo check that the
unbiased KL estimator's gradient from pi_old samples is the exact gradient of
KL(pi_theta || pi_ref) while k3's is not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsv32.rl.logprobs import token_entropy
from dsv32.rl.losses import aggregate, clipped_surrogate, grpo_loss, kl_penalty, off_policy_mask

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- clipped surrogate
def surrogate_case():
    """r = exp(logp - logp_old); seq 0 has A = +1, seq 1 has A = -2 and its last token masked.
    eps_low = 0.2, eps_high = 0.28."""
    ratios = t([[1.5, 0.9, 0.5], [1.5, 0.7, 1.1]])
    logp = ratios.log().requires_grad_()
    return logp, torch.zeros(2, 3, dtype=F64), t([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_clipped_surrogate_hand_values_and_metrics():
    logp, old, adv, mask = surrogate_case()
    s, m = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # seq 0: min(1.5, 1.28), 0.9, min(0.5, 0.8); seq 1: min(-3, -2.56), min(-1.4, -1.6), masked
    torch.testing.assert_close(s, t([[1.28, 0.9, 0.5], [-3.0, -1.6, 0.0]]))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)      # r = 1.5, A > 0
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)       # r = 0.7, A < 0
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5 + 1.5 + 0.7) / 5)
    assert m["ratio_max"].item() == pytest.approx(1.5)              # the masked 1.1 is ignored
    assert m["ratio_min"].item() == pytest.approx(0.5)


def test_clipping_stops_the_gradient_on_the_right_side_only():
    logp, old, adv, mask = surrogate_case()
    s, _ = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    s.sum().backward()
    # d(r A)/d logp = r A where the unclipped branch is active; 0 where clipping won
    # (r > 1+eps with A > 0, r < 1-eps with A < 0). r = 0.5 with A > 0 and r = 1.5 with A < 0
    # are outside the range too but keep their gradient: the objective is pessimistic.
    torch.testing.assert_close(logp.grad, t([[0.0, 0.9, 0.5], [-3.0, 0.0, 0.0]]))


def test_surrogate_ignores_garbage_at_padding():
    logp, old, adv, mask = surrogate_case()
    with torch.no_grad():
        logp[1, 2] = -math.inf
    old = old.clone()
    old[1, 2] = math.inf
    s, m = clipped_surrogate(logp, old, adv, mask)
    s.sum().backward()
    assert torch.isfinite(s).all() and torch.isfinite(logp.grad).all()
    assert torch.isfinite(m["ratio_mean"])


@pytest.mark.parametrize("kw", [dict(eps_low=0.0), dict(eps_low=1.0), dict(eps_high=-0.1), dict(eps_high=1.5)])
def test_clip_range_is_validated(kw):
    logp, old, adv, mask = surrogate_case()
    with pytest.raises(ValueError, match=f"{next(iter(kw))} must be in \\(0, 1\\)"):
        clipped_surrogate(logp, old, adv, mask, **kw)


def test_shapes_are_validated():
    logp, old, adv, mask = surrogate_case()
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_surrogate(logp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="logp_old must be"):
        clipped_surrogate(logp, old[:, :2], adv, mask)


# ---------------------------------------------------------------- aggregation
def test_aggregation_modes():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, math.nan], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # (2 + 4.5 + 0) / 3: every sequence weighs the same; an empty one contributes 0
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx(6.5 / 3)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(15 / 5)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(values, mask, "sum")


# ---------------------------------------------------------------- KL
def kl_case():
    """token 0: pi_theta .5, pi_ref .25, pi_old .25 -> x = log(ref/theta) = -log 2, r = 2;
    token 1: pi_theta .2, pi_ref .4, pi_old .4 -> x = log 2, r = .5; token 2 masked (junk)."""
    logp = t([[0.5, 0.2, 1e-30]]).log().requires_grad_()
    return logp, t([[0.25, 0.4, 1.0]]).log(), t([[0.25, 0.4, 1e-30]]).log(), torch.tensor([[1, 1, 0]])


def test_kl_estimators_hand_values():
    logp, old, ref, mask = kl_case()
    k3 = [0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0]
    kl, m = kl_penalty(logp, old, ref, mask, "k3")
    torch.testing.assert_close(kl, t([k3]))
    assert m["kl_mean"].item() == pytest.approx((k3[0] + k3[1]) / 2)
    kl, _ = kl_penalty(logp, old, ref, mask, "unbiased")
    torch.testing.assert_close(kl, t([[2 * k3[0], 0.5 * k3[1], 0.0]]))
    kl, m = kl_penalty(logp, old, None, mask, "none")
    assert not kl.any() and m == {}


def test_unbiased_kl_gradient_flows_through_the_ratio():
    logp, old, ref, mask = kl_case()
    kl, _ = kl_penalty(logp, old, ref, mask, "unbiased")
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    # d/dlogp [r k3] = r k3 + r (1 - pi_ref/pi_theta) = r log(pi_theta/pi_ref): the score-function
    # gradient of KL. With r detached it would be r (1 - pi_ref/pi_theta) = [1, -0.5].
    torch.testing.assert_close(grad, t([[2 * math.log(2), 0.5 * math.log(0.5), 0.0]]))
    kl, _ = kl_penalty(logp, old, ref, mask, "k3")
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(grad, t([[0.5, -1.0, 0.0]]))


def test_kl_bad_inputs():
    logp, old, ref, mask = kl_case()
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(logp, old, ref, mask, "k2")
    with pytest.raises(ValueError, match="logp_ref is required"):
        kl_penalty(logp, old, None, mask, "unbiased")


def categorical(seed=0):
    """5 actions: pi_theta (parameters), pi_old != pi_theta (the sampler), a fixed pi_ref."""
    theta = t([0.5, -0.3, 1.2, 0.0, -1.0])
    old = t([0.0, 0.4, 0.6, -0.5, -0.2]).log_softmax(-1)
    ref = t([-0.4, 0.2, 0.3, 0.8, 0.1]).log_softmax(-1)
    theta_ = theta.clone().requires_grad_()
    logp = theta_.log_softmax(-1)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta_)   # grad KL(theta || ref)
    return theta, old, ref, exact


def per_action_estimate(theta, old, ref, actions, estimator):
    """KL estimate for each sampled action as a (N, 1) batch of one-token sequences."""
    logp = theta.log_softmax(-1)[actions, None]
    kl, _ = kl_penalty(logp, old[actions, None], ref[actions, None], torch.ones_like(logp, dtype=torch.bool), estimator)
    return kl[:, 0]


def test_unbiased_kl_expected_gradient_is_exact_by_enumeration():
    theta, old, ref, exact = categorical()
    for estimator, should_match in (("unbiased", True), ("k3", False)):
        # row a: the gradient of the estimate for action a; weighting by pi_old is E_{pi_old}.
        jac = torch.autograd.functional.jacobian(lambda th: per_action_estimate(th, old, ref, torch.arange(5), estimator), theta)
        expected = old.exp() @ jac
        assert torch.allclose(expected, exact, atol=1e-12) == should_match


def test_unbiased_kl_gradient_monte_carlo():
    theta, old, ref, exact = categorical()
    n = 200_000
    actions = torch.multinomial(old.exp(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    errors = {}
    for estimator in ("unbiased", "k3"):
        theta_ = theta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(per_action_estimate(theta_, old, ref, actions, estimator).mean(), theta_)
        # Standard error of the sample-mean gradient, per component, from the exact per-action
        # gradients and pi_old (the per-sample gradient only depends on the action drawn).
        jac = torch.autograd.functional.jacobian(lambda th: per_action_estimate(th, old, ref, torch.arange(5), estimator), theta)
        mean = old.exp() @ jac
        se = (old.exp() @ (jac - mean) ** 2 / n).sqrt()
        errors[estimator] = (grad - exact, se)
    err, se = errors["unbiased"]
    # 5 sigma per component: a false failure would be a < 1e-5 event (and the seed is fixed).
    assert (err.abs() < 5 * se).all(), (err, se)
    assert err.norm() < 0.01 * exact.norm()
    err, se = errors["k3"]
    # k3's bias is structural: far beyond its sampling noise, and large relative to the gradient.
    assert (err.abs() / se).max() > 50, (err, se)
    assert err.norm() > 0.5 * exact.norm()


# ---------------------------------------------------------------- off-policy mask
def mask_case():
    """log(pi_old/pi_theta) per token; seq 0's third token is padding (junk 99)."""
    drift = t([[0.4, 0.2, 99.0], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]])
    logp = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    return logp, drift, t([-1.0, -1.0, 1.0]), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])


def test_off_policy_mask_hand_values():
    logp, old, adv, mask = mask_case()
    keep, m = off_policy_mask(logp, old, adv, mask, delta=0.2)
    # seq 0: A < 0 and mean drift 0.3 > 0.2 -> masked; seq 1: drift 0.1 -> kept;
    # seq 2: drift 0.5 but A > 0 -> kept.
    assert keep.tolist() == [0.0, 1.0, 1.0] and keep.dtype == F64
    assert not keep.requires_grad
    assert m["masked_frac"].item() == pytest.approx(1 / 3)
    assert m["kl_old_theta"].item() == pytest.approx((0.3 + 0.1 + 0.5) / 3)


@pytest.mark.parametrize("delta", [0.0, -0.1, math.nan])
def test_delta_is_validated(delta):
    logp, old, adv, mask = mask_case()
    with pytest.raises(ValueError, match="delta must be > 0"):
        off_policy_mask(logp, old, adv, mask, delta)


# ---------------------------------------------------------------- grpo_loss
def naive_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, estimator, delta, aggregation):
    """-J written element by element from docs/math.md §10, independently of the library's functions."""
    B, T = mask.shape
    seq_terms, total, n_tokens = [], 0.0, 0
    for i in range(B):
        toks = [j for j in range(T) if mask[i, j]]
        drift = sum(float(old[i, j] - logp[i, j].detach()) for j in toks) / max(len(toks), 1)
        m_i = 0.0 if (delta is not None and adv[i] < 0 and drift > delta) else 1.0
        seq = 0.0
        for j in toks:
            r = torch.exp(logp[i, j] - old[i, j])
            term = m_i * torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
            if estimator != "none":
                x = ref[i, j] - logp[i, j]
                k3 = torch.exp(x) - x - 1
                term = term - beta * (r * k3 if estimator == "unbiased" else k3)
            seq = seq + term
        seq_terms.append(seq / max(len(toks), 1))
        total, n_tokens = total + seq, n_tokens + len(toks)
    J = sum(seq_terms) / B if aggregation == "sequence_mean" else total / n_tokens
    return -J


def loss_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T = 4, 5
    logp = (-torch.rand(B, T, generator=gen, dtype=F64) * 2).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
    old[0] = logp[0].detach() + 0.5             # seq 0 drifted: masked for delta = 0.3 (A < 0)
    old[3] = logp[3].detach() - 0.4             # seq 3: r = 1.49 with A > 0, clipped high
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = t([-1.0, 0.5, -0.5, 1.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("estimator, delta, aggregation",
                         list(itertools.product(("unbiased", "k3", "none"), (None, 0.3), ("sequence_mean", "token_mean"))))
def test_grpo_loss_matches_naive_formula(estimator, delta, aggregation):
    logp, old, ref, adv, mask = loss_case()
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1)
    loss, metrics = grpo_loss(logp, old, adv, mask, logp_ref=ref, kl_estimator=estimator, delta=delta,
                              aggregation=aggregation, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    want = naive_loss(logp, old, ref, adv, mask, estimator=estimator, delta=delta, aggregation=aggregation, **kw)
    (want_grad,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)
    assert metrics["masked_frac"].item() == (0.25 if delta else 0.0)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0    # both clip sides exercised
    assert ("kl_mean" in metrics) == (estimator != "none")
    for v in metrics.values():
        assert v.ndim == 0 and not v.requires_grad


def test_masked_sequence_contributes_zero_policy_gradient():
    logp, old, ref, adv, mask = loss_case()
    loss, m = grpo_loss(logp, old, adv, mask, delta=0.3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert m["masked_frac"].item() == 0.25
    assert not grad[0].any() and grad[1:].abs().sum() > 0
    # With a KL term the masked sequence still feels the KL: exactly as if its advantage were 0.
    loss, _ = grpo_loss(logp, old, adv, mask, logp_ref=ref, beta=0.1, delta=0.3)
    (grad,) = torch.autograd.grad(loss, logp)
    zero_adv = adv.clone()
    zero_adv[0] = 0
    loss0, _ = grpo_loss(logp, old, zero_adv, mask, logp_ref=ref, beta=0.1)
    (grad0,) = torch.autograd.grad(loss0, logp)
    torch.testing.assert_close(grad[0], grad0[0])
    assert grad[0].abs().sum() > 0


def test_grpo_loss_switches_and_metrics():
    logp, old, ref, adv, mask = loss_case()
    base, m = grpo_loss(logp, old, adv, mask)
    assert set(m) == {"loss", "pg_objective", "clip_frac", "clip_frac_low", "clip_frac_high",
                      "ratio_mean", "ratio_max", "ratio_min", "masked_frac"}
    torch.testing.assert_close(m["loss"], -m["pg_objective"])
    # a reference with beta = 0 is reported, not optimised; "none" ignores beta
    reported, m = grpo_loss(logp, old, adv, mask, logp_ref=ref)
    torch.testing.assert_close(reported, base)
    assert m["kl_mean"] > 0
    torch.testing.assert_close(grpo_loss(logp, old, adv, mask, logp_ref=ref, beta=1.0, kl_estimator="none")[0], base)
    assert not torch.allclose(grpo_loss(logp, old, adv, mask, aggregation="token_mean")[0], base)
    # entropy metric from logits over the kept set, mean over valid tokens
    logits = torch.randn(*mask.shape, 11, dtype=F64, generator=torch.Generator().manual_seed(3))
    kept = torch.randint(0, 11, (*mask.shape, 3), generator=torch.Generator().manual_seed(4))
    _, m = grpo_loss(logp, old, adv, mask, logits=logits, kept=kept)
    want = token_entropy(logits, kept)[mask.bool()].mean()
    torch.testing.assert_close(m["entropy"], want)


@pytest.mark.parametrize("kw, match", [
    (dict(beta=0.1), "needs logp_ref"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(kl_estimator="k1"), "kl_estimator must be one of"),
    (dict(aggregation="seq"), "aggregation must be one of"),
    (dict(delta=0.0), "delta must be > 0"),
    (dict(eps_high=1.0), "eps_high must be in"),
])
def test_grpo_loss_bad_inputs(kw, match):
    logp, old, _, adv, mask = loss_case()
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, old, adv, mask, **kw)
