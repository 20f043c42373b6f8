"""The lightning indexer and top-k selection against brute force; FP8/Hadamard numerics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32.model.indexer import hadamard_matrix, index_scores, index_scores_tiled, select_topk


def brute_scores(q, w, k):
    """I(t,s) = sum_j w(t,j) ReLU(q(t,j).k(s)), one (t, s) at a time."""
    B, T, H, d = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, S)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                out[b, t, s] = sum(float(w[b, t, j]) * max(0.0, float(q[b, t, j] @ k[b, s])) for j in range(H))
    return out


def test_index_scores_formula():
    g = torch.Generator().manual_seed(0)
    q, w, k = torch.randn(1, 3, 4, 5, generator=g), torch.randn(1, 3, 4, generator=g), torch.randn(1, 6, 5, generator=g)
    torch.testing.assert_close(index_scores(q, w, k), brute_scores(q, w, k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 80])      # T·H_I <= 256: key-major (decode) path; 80: query-major tiles
def test_tiled_scores_equal_reference(T):
    g = torch.Generator().manual_seed(T)
    q, w = torch.randn(2, T, 4, 8, generator=g), torch.randn(2, T, 4, generator=g)
    k = torch.randn(2, 9000, 8, generator=g)            # more keys than one tile of either path
    torch.testing.assert_close(index_scores_tiled(q, w, k), index_scores(q, w, k), atol=1e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), start=st.integers(0, 6), topk=st.integers(1, 10), pad=st.integers(0, 4),
       block=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_select_topk_matches_brute_force(T, start, topk, pad, block, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, d = 2, 3, 4
    S = start + T
    q, w = torch.randn(B, T, H, d, generator=g), torch.randn(B, T, H, generator=g)
    k = torch.randn(B, S, d, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, : min(pad, S)] = False
    idx = select_topk(q, w, k, topk, q_start=start, key_valid=valid, block=block)
    assert idx.shape == (B, T, min(topk, S))
    scores = index_scores(q, w, k)
    for b in range(B):
        for t in range(T):
            allowed = [s for s in range(start + t + 1) if valid[b, s]]
            chosen = [int(s) for s in idx[b, t] if s >= 0]
            assert len(chosen) == min(topk, len(allowed))            # k_eff = min(k, #allowed)
            assert set(chosen) <= set(allowed)
            ranked = sorted(allowed, key=lambda s: -float(scores[b, t, s]))
            if len(chosen) < len(allowed):                          # a real top-k, ties aside
                worst_in = min(float(scores[b, t, s]) for s in chosen)
                best_out = max(float(scores[b, t, s]) for s in set(allowed) - set(chosen))
                assert worst_in >= best_out - 1e-6
            else:
                assert set(chosen) == set(ranked)


def test_hadamard_is_orthonormal_and_keeps_dot_products():
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), atol=1e-6, rtol=0)
    a, b = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close((a @ h) @ (b @ h).T, a @ b.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_fp8_indexer_changes_scores_only_slightly():
    from dsv32 import DSV32ForCausalLM
    from tests.conftest import tiny_model
    plain = tiny_model(seed=1, index_topk=4).eval()
    cfg = plain.config
    fp8 = DSV32ForCausalLM(cfg.replace(index_fp8=True)).eval()
    fp8.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(ids, return_indices=True)
        b = fp8(ids, return_indices=True)
    overlap = [len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in
               zip(a.indices[1].view(-1, 4), b.indices[1].view(-1, 4))]
    assert sum(overlap) / len(overlap) > 0.8
