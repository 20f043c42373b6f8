"""The vectorised sampler: inverse-CDF draws against a per-row loop, the counter-based per-row
stream, and draws that follow the truncated distribution (docs/math.md §9)."""

from __future__ import annotations

import pytest
import torch

from dsv32.inference.sampling import SamplingParams, inverse_cdf, kept_mask, row_uniforms, sample_next


def inverse_cdf_loop(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """Reference: walk each row's entries until the running sum exceeds u * total."""
    out = []
    for row, ub in zip(probs.double().tolist(), u.tolist()):
        target, acc, pick = ub * sum(row), 0.0, None
        for i, p in enumerate(row):
            acc += p
            if p > 0 and acc > target:
                pick = i
                break
        out.append(pick if pick is not None else max(i for i, p in enumerate(row) if p > 0))
    return out


def test_inverse_cdf_equals_a_per_row_loop():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 13, generator=gen)
    probs[probs < 0.3] = 0                    # zero entries, including leading and trailing ones
    probs[:, 0] += 1e-3                       # every row has mass
    u = torch.rand(64, dtype=torch.float64, generator=gen)
    u[:4] = torch.tensor([0.0, 1 - 2**-53, 0.5, 1e-12], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == inverse_cdf_loop(probs, u)


def test_row_uniforms_depend_on_seed_and_step_only():
    seeds = torch.tensor([0, 1, -5, 2**62 + 3, 7], dtype=torch.long)
    a = row_uniforms(seeds, 4)
    assert torch.equal(a[2:3], row_uniforms(seeds[2:3], 4))          # alone or in a batch
    assert not torch.equal(a, row_uniforms(seeds, 5))
    every = row_uniforms(seeds, torch.arange(7))                    # all steps at once, as generate draws
    assert every.shape == (5, 7) and all(torch.equal(every[:, s], row_uniforms(seeds, s)) for s in range(7))
    assert len(set(a.tolist())) == 5
    many = row_uniforms(torch.arange(20000), 0)
    assert ((many >= 0) & (many < 1)).all()
    # Uniform: every tenth of [0, 1) gets its share (binomial sd ~42 on 2000).
    counts = torch.histc(many.float(), bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 250


@pytest.mark.parametrize("params", [SamplingParams(1.0, 0, 1.0), SamplingParams(0.8, 5, 0.9)])
def test_draws_follow_the_truncated_distribution(params):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    n = 20000
    s = sample_next(logits.expand(n, -1), params, torch.arange(n), step=3)
    scaled = logits / params.temperature
    mask = kept_mask(scaled, params)
    p = torch.softmax(scaled if mask is None else scaled.masked_fill(~mask, float("-inf")), -1)[0]
    freq = torch.bincount(s.tokens, minlength=8).double() / n
    assert (freq - p.double()).abs().max() < 0.015                   # ~4 sd of the largest cell
    assert torch.allclose(s.logprob, p.log()[s.tokens], atol=1e-5)
    if mask is not None:
        assert mask[0, s.tokens].all()
