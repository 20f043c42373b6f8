"""Indexer scores and top-k selection (torch and reference backends) against brute force, and
the selection order: ties broken by key slot, the same set whatever the chunking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32 import kernels
from dsv32.kernels import index_scores, index_scores_tiled, select_topk_reference, select_topk_torch


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
    for backend in ("torch", "reference"):
        _check_against_brute_force(T, start, topk, pad, block, seed, backend)


def _check_against_brute_force(T, start, topk, pad, block, seed, backend):
    g = torch.Generator().manual_seed(seed)
    B, H, d = 2, 3, 4
    S = start + T
    q, w = torch.randn(B, T, H, d, generator=g), torch.randn(B, T, H, generator=g)
    k = torch.randn(B, S, d, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, : min(pad, S)] = False
    if backend == "torch":
        idx = select_topk_torch(q, w, k, topk, q_start=start, key_valid=valid, block=block)
    else:
        idx = select_topk_reference(q, w, k, topk, q_start=start, key_valid=valid)
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


# ------------------------------------------------------------------------- the selection order
def tied_inputs(B, T, S, Hi, d, seed, negative=True):
    """All head weights negative: every key whose ReLU terms are all zero scores exactly 0.0, the
    maximum, so many keys tie at the top (about S / 2^Hi of them per query)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, Hi, d, generator=g), torch.randn(B, S, d, generator=g)
    w = torch.randn(B, T, Hi, generator=g)
    return q, (-w.abs() if negative else w), k


def expected_order(q, w, k, topk, q_start, key_valid):
    """Brute force: allowed keys sorted by (score descending, slot ascending), the first k."""
    scores = index_scores(q, w, k)
    B, T = q.shape[:2]
    out = torch.full((B, T, min(topk, k.shape[1])), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            allowed = [s for s in range(q_start + t + 1) if key_valid is None or key_valid[b, s]]
            ranked = sorted(allowed, key=lambda s: (-float(scores[b, t, s]), s))[: out.shape[-1]]
            out[b, t, : len(ranked)] = torch.tensor(ranked, dtype=torch.long)
    return out


def boundary_ties(q, w, k, topk, q_start=0, key_valid=None):
    """Queries whose k-th and (k+1)-th best allowed scores are equal: `topk` alone is ambiguous."""
    T, S = q.shape[1], k.shape[1]
    scores = index_scores_tiled(q, w, k).masked_fill(
        ~kernels.allowed_keys(S, torch.arange(q_start, q_start + T), key_valid), float("-inf"))
    best = scores.topk(min(topk + 1, S), dim=-1).values
    return int(((best[..., topk - 1] == best[..., topk]) & torch.isfinite(best[..., topk])).sum())


def chunked(select, q, w, k, topk, sizes, key_valid=None, **kw):
    """Selections of consecutive query chunks of the given sizes (the last repeated until T is
    covered), each seeing only the keys up to its last query -- as prefill over a cache does.
    Early chunks see fewer than k keys; their rows are padded with -1 to the full width."""
    parts, t0, i = [], 0, 0
    T = q.shape[1]
    while t0 < T:
        t1 = min(T, t0 + sizes[min(i, len(sizes) - 1)])
        part = select(q[:, t0:t1], w[:, t0:t1], k[:, :t1], topk, q_start=t0,
                      key_valid=None if key_valid is None else key_valid[:, :t1], **kw)
        parts.append(torch.nn.functional.pad(part, (0, min(topk, T) - part.shape[-1]), value=-1))
        t0, i = t1, i + 1
    return torch.cat(parts, dim=1)


def test_order_codes_rank_by_score_then_lower_slot():
    from dsv32.kernels.torch_indexer import order_codes, topk_ordered
    scores = torch.tensor([[1.0, -0.0, 0.0, -1.0, float("-inf"), 2.0, 0.0, -3.5, 1e-30, -1e-30]])
    got = topk_ordered(order_codes(scores, torch.arange(10)), 10)
    assert got.tolist() == [[5, 0, 8, 1, 2, 6, 9, 3, 7, -1]]       # -0.0 == 0.0; -inf never chosen


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("q_start", [0, 9])
def test_exact_ties_go_to_the_lower_slot(backend, q_start):
    B, T, Hi, d, topk = 2, 12, 1, 8, 3
    q, w, k = tied_inputs(B, T, q_start + T, Hi, d, seed=1)
    valid = torch.ones(B, q_start + T, dtype=torch.bool)
    valid[1, :2] = False
    got = kernels.select_topk(q, w, k, topk, q_start=q_start, key_valid=valid, backend=backend)
    ref = expected_order(q, w, k, topk, q_start, valid)
    assert boundary_ties(q, w, k, topk, q_start, valid) >= 3     # the case really has ties
    assert torch.equal(got, ref)


@pytest.mark.parametrize("sizes", [[1], [3], [7, 1], [64]])
def test_exact_ties_same_set_whatever_the_chunking(sizes):
    """One-shot prefill, chunked prefill, and decode (chunks of one query) select the same keys,
    in the same order, on both backends."""
    B, T, Hi, d, topk = 2, 40, 2, 8, 6
    q, w, k = tied_inputs(B, T, T, Hi, d, seed=2)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :4] = False
    one_shot = select_topk_torch(q, w, k, topk, key_valid=valid)
    assert boundary_ties(q, w, k, topk, 0, valid) >= 20
    assert torch.equal(one_shot, select_topk_reference(q, w, k, topk, key_valid=valid))
    assert torch.equal(chunked(select_topk_torch, q, w, k, topk, sizes, valid), one_shot)
    assert torch.equal(chunked(select_topk_torch, q, w, k, topk, sizes, valid, block=2), one_shot)
    assert torch.equal(chunked(select_topk_reference, q, w, k, topk, sizes, valid), one_shot)


def test_long_random_one_shot_equals_chunked_prefill_and_decode():
    """L = 2K, 4 random indexer heads, k = 64 (issue 16 at a CPU-test scale): about 1/16 of the
    queries have all-negative head weights and dozens of keys tied at 0.0 around the k-th place."""
    L, Hi, d, topk = 2048, 4, 32, 64
    q, w, k = tied_inputs(1, L, L, Hi, d, seed=3, negative=False)
    one_shot = select_topk_torch(q, w, k, topk)
    assert boundary_ties(q, w, k, topk) > 20            # the order really is exercised
    for sizes in ([1000], [300], [L - 8, 1]):           # the last: prefill, then 8 decode steps
        assert torch.equal(chunked(select_topk_torch, q, w, k, topk, sizes), one_shot), sizes


def test_selection_dispatch():
    cpu = torch.device("cpu")
    assert kernels.resolve_selector("auto", cpu) == "torch"
    assert kernels.resolve_selector("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="top-k selection backend"):
        kernels.select_topk(*tied_inputs(1, 2, 2, 2, 4, seed=0), 1, backend="nope")
    q, w, k = tied_inputs(2, 9, 12, 3, 8, seed=5, negative=False)
    torch.testing.assert_close(kernels.select_topk(q, w, k, 4, q_start=3, window=2, sink=1),
                               select_topk_reference(q, w, k, 4, q_start=3, window=2, sink=1))


@pytest.mark.parametrize("window,sink", [(0, 0), (2, 1)])
def test_unordered_selection_is_the_same_set(window, sink):
    """`ordered=False` (the masked attention path reads the selection as a set) returns each
    row's slots in some order, but the same slots as the ordered selection and the reference;
    with ties at the k-th place, padding, several query blocks and forced window/sink slots."""
    B, T, Hi, d, topk = 2, 40, 2, 8, 6
    q, w, k = tied_inputs(B, T, T + 5, Hi, d, seed=4)
    valid = torch.ones(B, T + 5, dtype=torch.bool)
    valid[1, :3] = False
    kw = dict(q_start=5, key_valid=valid, window=window, sink=sink)
    ordered = kernels.select_topk(q, w, k, topk, backend="torch", **kw)
    assert boundary_ties(q, w, k, topk, 5, valid) >= 3
    assert torch.equal(ordered, select_topk_reference(q, w, k, topk, **kw))
    for block in (None, 7):
        loose = select_topk_torch(q, w, k, topk, block=block, ordered=False, **kw)
        assert torch.equal(loose[..., : window + sink], ordered[..., : window + sink])   # forced slots first
        assert torch.equal(loose.sort(-1).values, ordered.sort(-1).values)
    assert torch.equal(kernels.select_topk(q, w, k, topk, backend="reference", ordered=False, **kw), ordered)


def test_no_queries_or_no_keys():
    q, w, k = torch.randn(1, 0, 4, 8), torch.randn(1, 0, 4), torch.randn(1, 5, 8)
    assert select_topk_torch(q, w, k, 3).shape == (1, 0, 3)
    assert select_topk_torch(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4), k[:, :0], 3).shape == (1, 2, 0)


def test_prefill_scores_on_onednn_match_reference(monkeypatch):
    """A standard block (T·H_I = _ROWS_PER_BLOCK rows) scores whole key tiles on oneDNN (product
    + ReLU in one call) and the last, partial tile on torch.mm: equal to the reference, and equal
    with oneDNN switched off."""
    from dsv32.kernels import index_scores, index_scores_tiled, torch_indexer

    real = torch_indexer._onednn_linear()
    if real is None:
        pytest.skip("torch built without oneDNN")
    shapes = []
    monkeypatch.setattr(torch_indexer, "_onednn_linear", lambda: lambda *a: shapes.append(tuple(a[1].shape)) or real(*a))
    Hi = 4
    T = torch_indexer._ROWS_PER_BLOCK // Hi
    g = torch.Generator().manual_seed(3)
    q, w, k = torch.randn(1, T, Hi, 16, generator=g), torch.randn(1, T, Hi, generator=g), torch.randn(1, 1100, 16, generator=g)
    on = index_scores_tiled(q, w, k)
    assert shapes == [(512, 16), (512, 16)]          # two whole 512-key tiles; the last 76 keys on torch.mm
    torch.testing.assert_close(on, index_scores(q, w, k), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    off = index_scores_tiled(q, w, k)
    assert len(shapes) == 2
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
