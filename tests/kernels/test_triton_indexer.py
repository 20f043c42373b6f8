"""Triton indexer selection (fused scores + two-stage top-k) against `select_topk_torch`.

Runs under the Triton interpreter on CPU when there is no GPU, compiled on CUDA otherwise (see
triton_env.py for why one process tests one mode). Selections are compared "ties
aside": the two must choose the same number of slots per query, every chosen slot must be
allowed and unique, and the chosen scores, sorted, must match the reference's.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_env import DEVICE, LOW   # first: picks the Triton interpreter without a GPU

pytest.importorskip("triton", reason="triton is not installed (pip install dsv32[gpu])")

from dsv32 import kernels  # noqa: E402
from dsv32.kernels.triton_indexer import select_topk_triton  # noqa: E402
from dsv32.model.context import AttentionOptions  # noqa: E402
from dsv32.kernels import allowed_keys, index_scores  # noqa: E402
from dsv32.kernels import select_topk_torch as select_topk  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402


def make_inputs(B, T, Hi, d, S, dtype=torch.float32, pad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hi, d, generator=gen)
    k = torch.randn(B, S, d, generator=gen)
    w = torch.randn(B, T, Hi, generator=gen) * Hi ** -0.5
    key_valid = None
    if pad:
        key_valid = torch.ones(B, S, dtype=torch.bool)
        key_valid[0, :3] = False          # left padding
        key_valid[-1, 5:7] = False        # a hole in the middle
        key_valid = key_valid.to(DEVICE)
    return q.to(DEVICE, dtype), w.to(DEVICE), k.to(DEVICE, dtype), key_valid


def check_same_selection(q, w, k, topk, q_start, key_valid, **kw):
    got = select_topk_triton(q, w, k, topk, q_start=q_start, key_valid=key_valid, **kw)
    ref = select_topk(q.float(), w, k.float(), topk, q_start=q_start, key_valid=key_valid)
    assert got.shape == ref.shape and got.dtype == torch.long
    assert ((got >= 0).sum(-1) == (ref >= 0).sum(-1)).all()        # k_eff = min(k, #allowed)
    B, T, _ = got.shape
    q_slots = torch.arange(q_start, q_start + T, device=q.device)
    allowed = allowed_keys(k.shape[1], q_slots, key_valid).expand(B, -1, -1)
    chosen = got >= 0
    assert allowed.gather(-1, got.clamp(min=0))[chosen].all()
    ordered = got.sort(-1).values
    assert not ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()
    scores = index_scores(q.float(), w, k.float())
    pick = lambda idx: torch.where(idx >= 0, scores.gather(-1, idx.clamp(min=0)), float("-inf"))  # noqa: E731
    torch.testing.assert_close(pick(got).sort(-1).values, pick(ref).sort(-1).values,
                               atol=1e-4, rtol=1e-4)
    return got


@pytest.mark.parametrize("topk,block_s", [(5, 16), (20, 16), (7, 64)])
def test_prefill_matches_select_topk(topk, block_s):
    """topk < block_s prunes per block (packed sort); topk >= block_s keeps every score. H_I = 6
    and d_I = 20 are not powers of two; 30 keys leave a partial last block."""
    q, w, k, key_valid = make_inputs(2, 30, 6, 20, 30)
    check_same_selection(q, w, k, topk, 0, key_valid, block_s=block_s)


def test_chunked_prefill_over_a_cache():
    """Queries at slots 21..29 over 30 keys, in chunks of 4 queries."""
    q, w, k, key_valid = make_inputs(2, 9, 8, 32, 30, seed=1)
    check_same_selection(q, w, k, 6, 21, key_valid, block=4, block_s=16)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
def test_decode_over_a_cache(dtype):
    """T = 1 at the last slot; 64 heads x 128 dims as in V3.2 (one 64-row tile per key block)."""
    q, w, k, key_valid = make_inputs(2, 1, 64, 128, 200, dtype=dtype, seed=2)
    check_same_selection(q, w, k, 24, 199, key_valid)


def test_decode_reads_a_strided_cache_view():
    """Keys as a (B, S, d) view of a preallocated (B, S_max, d) cache: read in place."""
    q, w, k, key_valid = make_inputs(2, 1, 8, 16, 40, seed=4)
    buffer = torch.zeros(2, 64, 16, device=DEVICE)
    buffer[:, :40] = k
    view = buffer[:, :40]
    assert not view.is_contiguous()
    check_same_selection(q, w, view, 6, 39, key_valid, block_s=16)


def test_fewer_allowed_keys_than_topk():
    """Early queries see fewer keys than topk: the tail of their rows is -1. A decode query at
    slot 16 = the first key of the second block must still see itself (block-skip boundary)."""
    q, w, k, _ = make_inputs(1, 6, 4, 16, 6, pad=False, seed=3)
    got = check_same_selection(q, w, k, 4, 0, None, block_s=16)
    assert (got[0, 0, 1:] == -1).all() and (got[0, 3:] >= 0).all()
    q, w, k, _ = make_inputs(1, 1, 4, 16, 17, pad=False, seed=3)
    got = check_same_selection(q, w, k, 20, 16, None, block_s=16)
    assert sorted(got[0, 0].tolist()) == list(range(17))


def test_window_and_sink_fall_back_to_torch():
    q, w, k, key_valid = make_inputs(2, 5, 4, 16, 20, seed=4)
    kw = dict(q_start=15, key_valid=key_valid, window=2, sink=1)
    torch.testing.assert_close(select_topk_triton(q, w, k, 3, **kw), select_topk(q, w, k, 3, **kw))


@pytest.mark.parametrize("topk", [3, 20])          # 3: blocks pruned to their top 4; 20: no pruning
def test_exact_ties_same_order_as_torch_and_chunk_independent(topk):
    """All head weights negative: many keys score exactly 0.0 (the maximum). The Triton selector
    must pick the lower slots among them, exactly as the torch path does, in one pass or in
    chunks of queries (prefill over a cache), and down to decode (one query)."""
    T, S = 6, 40
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, T, 2, 16, generator=gen), torch.randn(1, S, 16, generator=gen)
    w = -torch.rand(1, T, 2, generator=gen) - 0.1
    q, w, k = q.to(DEVICE), w.to(DEVICE), k.to(DEVICE)
    q_start = S - T
    ties = (index_scores(q, w, k) == 0).sum(-1)
    assert (ties > 3).all()                            # more tied keys at the top than topk=3
    ref = select_topk(q, w, k, topk, q_start=q_start)
    got = select_topk_triton(q, w, k, topk, q_start=q_start, block_s=16)
    assert torch.equal(got, ref)
    for t0, t1 in ((0, 2), (2, 5), (5, 6)):
        part = select_topk_triton(q[:, t0:t1], w[:, t0:t1], k[:, :q_start + t1], topk, q_start=q_start + t0,
                                  block_s=16)
        assert torch.equal(part, ref[:, t0:t1, : part.shape[-1]])


def test_selector_dispatch():
    expected = "triton" if DEVICE == "cuda" else "torch"
    assert kernels.resolve_selector("auto", torch.device(DEVICE)) == expected
    assert kernels._SELECTORS["triton"] is select_topk_triton


def test_bad_inputs_raise():
    q, w, k, _ = make_inputs(1, 2, 4, 16, 8, pad=False)
    with pytest.raises(ValueError):
        select_topk_triton(q, w, k.half(), 3)
    with pytest.raises(ValueError):
        select_topk_triton(q, w[..., :-1], k, 3)
    with pytest.raises(ValueError):
        select_topk_triton(q, w, k, 3, block_s=24)


@pytest.mark.skipif(DEVICE != "cuda", reason="the model uses the Triton paths on CUDA only")
def test_model_auto_backend_matches_torch_on_cuda():
    """A tiny sparse model on CUDA: 'auto' (Triton selection + attention) equals 'torch'."""
    model = tiny_model(seed=3, index_topk=4).eval().to(DEVICE)
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        fast = model(ids, attention=AttentionOptions(backend="auto"))
        slow = model(ids, attention=AttentionOptions(backend="torch"))
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=1e-4)
