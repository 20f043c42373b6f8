"""The indexer's decode path (few query rows: one key-major product per key tile, ReLU -- fused
in one oneDNN call on CPU, or torch.mm and an in-place ReLU -- and a matrix-vector head sum for a
single query) against the reference scores and selection."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import index_scores, index_scores_tiled, select_topk_reference, select_topk_torch, torch_indexer


@pytest.mark.parametrize("fused", [True, False])                  # oneDNN product + ReLU, or torch.mm
@pytest.mark.parametrize("T,Hi,d,S", [(1, 4, 32, 3000), (1, 64, 16, 700), (2, 8, 16, 1500), (4, 64, 8, 300),
                                      (1, 64, 128, 9000)])
def test_decode_scores_match_reference(T, Hi, d, S, fused, monkeypatch):
    if fused and torch_indexer._linear_relu() is None:
        pytest.skip("torch built without oneDNN")
    if not fused:
        monkeypatch.setattr(torch_indexer, "_linear_relu", lambda: None)
    else:                                   # 256-key oneDNN tiles: whole tiles and a partial one
        monkeypatch.setattr(torch_indexer, "_FUSED_TILE_BYTES", 4 * T * Hi * 256)
    g = torch.Generator().manual_seed(T + Hi + S)
    q, w, k = torch.randn(2, T, Hi, d, generator=g), torch.randn(2, T, Hi, generator=g), torch.randn(2, S, d, generator=g)
    torch.testing.assert_close(index_scores_tiled(q, w, k), index_scores(q, w, k), rtol=1e-5, atol=1e-4)


def test_decode_selection_matches_reference_with_ties_and_padding():
    """One query over a long cache, padded keys, and small-integer inputs, so every score is exact
    in any summation order and ties are many (row 0's head weights are all negative: every key
    whose ReLU terms vanish ties at the maximum, 0.0)."""
    g = torch.Generator().manual_seed(5)
    B, Hi, d, S = 2, 4, 16, 2500
    q = torch.randint(-2, 3, (B, 1, Hi, d), generator=g).float()
    k = torch.randint(-2, 3, (B, S, d), generator=g).float()
    w = torch.randint(-3, 4, (B, 1, Hi), generator=g).float()
    w[0] = -torch.randint(1, 4, (1, Hi), generator=g).float()
    key_valid = torch.rand(B, S, generator=g) > 0.1
    got = select_topk_torch(q, w, k, 300, q_start=S - 1, key_valid=key_valid)
    want = select_topk_reference(q, w, k, 300, q_start=S - 1, key_valid=key_valid)
    assert torch.equal(got, want)


def test_decode_scores_without_onednn_when_switched_off(monkeypatch):
    """`torch.backends.mkldnn.enabled = False` sends decode scoring to the torch.mm path."""
    calls = []
    real = torch_indexer._onednn_linear()
    if real is None:
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(torch_indexer, "_onednn_linear", lambda: lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(torch_indexer, "_FUSED_TILE_BYTES", 4 * 8 * 100)
    g = torch.Generator().manual_seed(1)
    q, w, k = torch.randn(1, 1, 8, 16, generator=g), torch.randn(1, 1, 8, generator=g), torch.randn(1, 300, 16, generator=g)
    torch.backends.mkldnn.enabled = False
    try:
        off = index_scores_tiled(q, w, k)
    finally:
        torch.backends.mkldnn.enabled = True
    assert not calls
    on = index_scores_tiled(q, w, k)
    assert calls
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)


def test_onednn_sees_one_shape_whatever_the_cache_length(monkeypatch):
    """oneDNN compiles per shape, so it gets whole tiles only: a cache shorter than a tile (a
    decode's growing cache, a GRPO rollout) and the last partial tile go to torch.mm."""
    real = torch_indexer._onednn_linear()
    if real is None:
        pytest.skip("torch built without oneDNN")
    shapes = []
    monkeypatch.setattr(torch_indexer, "_onednn_linear", lambda: lambda *a: shapes.append(tuple(a[0].shape)) or real(*a))
    monkeypatch.setattr(torch_indexer, "_FUSED_TILE_BYTES", 4 * 8 * 128)           # 128-key tiles
    g = torch.Generator().manual_seed(2)
    q, w = torch.randn(1, 1, 8, 16, generator=g), torch.randn(1, 1, 8, generator=g)
    for S in (5, 127, 128, 129, 300, 512):
        k = torch.randn(1, S, 16, generator=g)
        torch.testing.assert_close(index_scores_tiled(q, w, k), index_scores(q, w, k), rtol=1e-5, atol=1e-4)
    assert set(shapes) == {(128, 16)} and len(shapes) == 1 + 1 + 2 + 4
