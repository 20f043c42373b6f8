"""The dense-masked sparse MLA path (`kernels/torch_masked.py`) against the plain-torch reference
and the gather kernel: values, log-sum-exp and gradients, in both its forms, and the automatic
choice between it and the gather kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32 import kernels
from dsv32.kernels import torch_masked


def make(B, T, S, H, C, K, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(B, T, H, C, generator=g), torch.randn(B, S, C, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    idx = torch.where(torch.rand(B, T, K, generator=g) < 0.3, -1, idx)
    idx[0, 0] = -1                                      # a query with no keys at all
    return q, kv, idx


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(torch_masked, "_QUERY_CHUNK", 3)     # several chunks, each with its own key reach


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), S=st.integers(1, 12), H=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_sparse_mla_masked_matches_reference_and_gather(B, T, S, H, seed):
    C, dv = 12, 8
    q, kv, idx = make(B, T, S, H, C, min(S, 5), seed)
    dout = torch.randn(B, T, H, dv, generator=torch.Generator().manual_seed(seed))
    results = {}
    for backend in ("masked", "reference", "torch"):
        q1, kv1 = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out, lse = kernels.sparse_mla(q1, kv1, idx, 0.3, dv, backend=backend)
        dq, dkv = torch.autograd.grad((out * dout).sum(), (q1, kv1))
        results[backend] = (out, lse, dq, dkv)
    masked = results["masked"]
    assert (masked[0][0, 0] == 0).all() and torch.isinf(masked[1][0, 0]).all()
    for other in ("reference", "torch"):
        for a, b in zip(masked, results[other]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("S", [10, 13])
def test_causal_call_and_chunks_match_reference(S, small_chunks):
    """S == T with a causal selection: one causal SDPA call; S > T (queries after a cache): chunks,
    each scoring keys only up to its largest selected slot. Both equal the reference."""
    T, H, C, dv = 10, 2, 6, 4
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(1, T, H, C, generator=g), torch.randn(1, S, C, generator=g)
    causal = torch.rand(T, S, generator=g).masked_fill(torch.ones(T, S, dtype=torch.bool).triu(S - T + 1), -1.0)
    top = causal.topk(4, dim=-1)
    idx = torch.where(top.values < 0, -1, top.indices)[None]
    calls = list(torch_masked._chunks(idx, S))
    if S == T:
        assert calls == [(0, T, S, True)]
    else:
        assert [(t0, t1, c) for t0, t1, _, c in calls] == [(0, 3, False), (3, 6, False), (6, 9, False), (9, 10, False)]
        assert all(n_keys <= S - T + t1 for _, t1, n_keys, _ in calls)     # never past the chunk's last query
    out, lse = kernels.sparse_mla(q, kv, idx, 0.5, dv, backend="masked")
    ref, ref_lse = kernels.sparse_mla(q, kv, idx, 0.5, dv, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_non_causal_selection_is_chunked():
    """A selection that reaches past its query (e.g. replayed slots) never takes the causal call."""
    idx = torch.tensor([[[0, 2], [1, -1], [2, 0]]])              # query 0 selects slot 2
    assert [c for *_, c in torch_masked._chunks(idx, 3)] == [False]


def absorbed_inputs(seed, B=2, T=7, S=7, H=3, d_n=6, d_r=4, d_v=5, r=8, K=4):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, T, H, d_n, generator=g), torch.randn(B, T, H, d_r, generator=g),
              torch.randn(B, S, r + d_r, generator=g), torch.randn(H, d_n, r, generator=g),
              torch.randn(H, d_v, r, generator=g)]
    causal = torch.rand(B, T, S, generator=g).masked_fill(torch.ones(T, S, dtype=torch.bool).triu(S - T + 1), -1.0)
    top = causal.topk(K, dim=-1)
    return leaves, torch.where(top.values < 0, -1, top.indices)


@pytest.mark.parametrize("seed,S", [(0, 7), (1, 9)])       # one causal call; chunks after a cache
def test_expanded_masked_form_matches_absorbed_gather(seed, S, small_chunks):
    """`sparse_mla_absorbed` on the masked path (expanded per-head keys/values) equals the gather
    kernel and the reference, values and gradients of all five inputs."""
    leaves, idx = absorbed_inputs(seed, S=S)
    dout = torch.randn(2, 7, 3, 5, generator=torch.Generator().manual_seed(seed))
    grads = {}
    for backend in ("masked", "torch", "reference"):
        xs = [t.clone().requires_grad_() for t in leaves]
        out = kernels.sparse_mla_absorbed(*xs[:3], idx, *xs[3:], 0.4, backend=backend)
        grads[backend] = (out, *torch.autograd.grad((out * dout).sum(), xs))
    for other in ("torch", "reference"):
        for a, b in zip(grads["masked"], grads[other]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)   # values up to ~30: float32 sums


def test_cost_rule_picks_masked_for_few_heads_short_sequences():
    small = dict(d_qk=48, d_v=32, C=80)                  # the `small` preset's head dims
    assert torch_masked.choose_masked(1024, 1024, 4, 256, **small)
    assert not torch_masked.choose_masked(8192, 8192, 4, 256, **small)
    assert not torch_masked.choose_masked(4096, 4096, 64, 256, **small)
    assert not torch_masked.choose_masked(1, 65536, 4, 256, **small)       # decode: one query, long cache
    assert torch_masked.choose_masked(256, 256, 64, 256, **small)          # every key selected anyway


def test_auto_uses_the_rule_only_with_gradients(monkeypatch):
    calls = []
    real = torch_masked.absorb_attend_masked

    def spy(*args):
        calls.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(kernels, "absorb_attend_masked", spy)
    leaves, idx = absorbed_inputs(2)
    xs = [t.clone().requires_grad_() for t in leaves]
    out = kernels.sparse_mla_absorbed(*xs[:3], idx, *xs[3:], 0.4, backend="auto")   # T = S = 7: masked
    with torch.no_grad():
        kernels.sparse_mla_absorbed(*leaves[:3], idx, *leaves[3:], 0.4, backend="auto")
    kernels.sparse_mla_absorbed(*xs[:3], idx, *xs[3:], 0.4, backend="torch")         # explicit: gather
    assert calls == [True]
    ref = kernels.sparse_mla_absorbed(*leaves[:3], idx, *leaves[3:], 0.4, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_no_keys_at_all():
    q, kv = torch.randn(1, 3, 2, 6), torch.randn(1, 4, 6)
    out, lse = kernels.sparse_mla(q, kv, torch.zeros(1, 3, 0, dtype=torch.long), 0.5, 4, backend="masked")
    assert out.shape == (1, 3, 2, 4) and (out == 0).all() and torch.isinf(lse).all()
