"""Top-k selection through the model: the selected sets are a function of the scores (ties go to
the earlier key) whatever the chunking -- one-shot forward, chunked prefill over the cache,
decode -- and k is read per call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv32 import AttentionOptions, DSV32ForCausalLM, Records
from dsv32.inference import LatentCache
from tests.conftest import randomize_, tiny_config

TOPK = 4


def tied_model():
    """Every indexer head weight 0: every allowed key scores exactly 0.0, so every selection is
    decided by the tie order alone."""
    model = randomize_(DSV32ForCausalLM(tiny_config(index_topk=TOPK)), seed=2).eval()
    for layer in model.model.layers:
        layer.self_attn.indexer.weights_proj.weight.data.zero_()
    return model


def batch(T=13):
    ids = torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0                                          # left padding
    return ids, mask


def chunked_prefill(model, ids, mask, size):
    """Logits and per-layer selections of a prefill over the cache in chunks of `size` tokens
    (size 1 = token-by-token decode); selections padded with -1 to width TOPK."""
    cache, logits, indices = LatentCache(model.config), [], {}
    for c0 in range(0, ids.shape[1], size):
        out = model(ids[:, c0:c0 + size], attention_mask=mask[:, c0:c0 + size], cache=cache, records=Records(record_indices=True))
        logits.append(out.logits)
        for layer, idx in out.indices.items():
            indices.setdefault(layer, []).append(F.pad(idx, (0, TOPK - idx.shape[-1]), value=-1))
    return torch.cat(logits, 1), {layer: torch.cat(parts, 1) for layer, parts in indices.items()}


def test_exact_ties_select_the_earliest_keys_whatever_the_chunking():
    model = tied_model()
    ids, mask = batch()
    with torch.no_grad():
        one_shot = model(ids, attention_mask=mask, records=Records(record_indices=True))
    T = ids.shape[1]
    # The order alone decides: each query takes its first TOPK real keys, in slot order.
    expected = torch.full((2, T, TOPK), -1, dtype=torch.long)
    for b in range(2):
        real = [s for s in range(T) if mask[b, s]]
        for t in range(T):
            first = [s for s in real if s <= t][:TOPK]
            expected[b, t, : len(first)] = torch.tensor(first, dtype=torch.long)
    real = mask.bool()
    assert one_shot.indices
    for layer, idx in one_shot.indices.items():
        assert torch.equal(idx[real], expected[real]), layer
    for size in (1, 3, 7):
        with torch.no_grad():
            logits, indices = chunked_prefill(model, ids, mask, size)
        assert indices.keys() == one_shot.indices.keys()
        for layer in indices:
            assert torch.equal(indices[layer][real], one_shot.indices[layer][real]), (size, layer)
        torch.testing.assert_close(logits[real], one_shot.logits[real], atol=1e-5, rtol=0)


def test_topk_is_read_per_call():
    """AttentionOptions.topk changes k without building another model: the same logits and
    selections as a model built with that index_topk."""
    model = randomize_(DSV32ForCausalLM(tiny_config(index_topk=8)), seed=1).eval()
    small = DSV32ForCausalLM(tiny_config(index_topk=3), init=False).eval()
    small.load_state_dict(model.state_dict())
    ids, mask = batch(T=16)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, attention=AttentionOptions(topk=3), records=Records(record_indices=True))
        b = small(ids, attention_mask=mask, records=Records(record_indices=True))
        c = model(ids, attention_mask=mask, records=Records(record_indices=True))
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    for layer in b.indices:
        assert a.indices[layer].shape[-1] == 3 and torch.equal(a.indices[layer], b.indices[layer])
        assert c.indices[layer].shape[-1] == 8
    assert (a.logits - c.logits).abs().max() > 1e-4


def test_dense_shortcut_is_its_own_option():
    """S <= k: the shortcut runs dense attention for any backend; without it the sparse kernels
    run (the same values: tests/model/test_invariants.py); a bad k is refused."""
    model = randomize_(DSV32ForCausalLM(tiny_config(index_topk=32)), seed=1).eval()
    ids, _ = batch(T=10)
    calls = []
    from dsv32 import kernels
    real = kernels._BACKENDS["torch"]
    kernels._BACKENDS["torch"] = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            model(ids, attention=AttentionOptions(backend="torch"))
            assert not calls
            model(ids, attention=AttentionOptions(backend="torch", dense_shortcut=False))
            assert calls
    finally:
        kernels._BACKENDS["torch"] = real
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="topk"):
            AttentionOptions(topk=bad)
