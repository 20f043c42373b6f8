"""Decode-step fast paths against their plain references: the positions a forward derives from
the cache's key mask (one sum over the past instead of a cumsum over the whole cache) and the
indexer's few-query scoring (one key-major product, ReLU, one matrix-vector head sum)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsv32.kernels import index_scores, index_scores_tiled, select_topk_reference, select_topk_torch
from dsv32.model.context import call_geometry


def _positions_reference(key_valid: torch.Tensor, q_start: int) -> torch.Tensor:
    """Positions count real tokens: the cumsum of the whole key mask, read at the new slots."""
    return (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]


@pytest.mark.parametrize("past,T", [(0, 5), (7, 1), (7, 3), (1, 1)])
def test_call_geometry_positions_match_cumsum_over_the_cache(past, T):
    g = torch.Generator().manual_seed(past * 10 + T)
    B = 3
    past_valid = torch.rand(B, past, generator=g) > 0.3
    if past:
        past_valid[0] = False                          # a row whose past is all padding
    new_valid = torch.rand(B, T, generator=g) > 0.2
    # call_geometry reads only a cache's `length` and `key_valid` (its past key mask).
    cache = SimpleNamespace(length=past, key_valid=past_valid) if past else None
    ids = torch.zeros(B, T, dtype=torch.long)
    q_start, _, key_valid, pos = call_geometry(ids, new_valid, None, cache)
    assert q_start == past
    assert torch.equal(key_valid, torch.cat((past_valid, new_valid), 1))
    assert torch.equal(pos, _positions_reference(key_valid, q_start))


@pytest.mark.parametrize("T,Hi,d,S", [(1, 4, 32, 3000), (1, 64, 16, 700), (2, 8, 16, 1500), (4, 64, 8, 300)])
def test_decode_scores_match_reference(T, Hi, d, S):
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
