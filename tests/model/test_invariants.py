"""Invariants of the attention paths: top-k >= length is dense; absorbed equals expanded;
the blocked-gather sparse kernel equals the dense masked reference, forward and backward
(gradients of every parameter); padding; the window/sink extension."""

from __future__ import annotations

import pytest
import torch

from dsv32 import AttentionOptions, DSV32ForCausalLM, Records
from tests.conftest import tiny_model


def model_for(seed=0, **overrides):
    return tiny_model(seed=seed, **overrides)


def batch(cfg, B=2, T=20, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[0, :5] = 0
    return ids, mask


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_topk_at_least_length_equals_dense(backend):
    model = model_for(index_topk=64)
    ids, mask = batch(model.config, T=20)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, attention=AttentionOptions(sparse=False)).logits
        sparse = model(ids, attention_mask=mask,
                       attention=AttentionOptions(sparse=True, backend=backend, dense_shortcut=False)).logits
        auto = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(auto[real], dense[real], atol=1e-5, rtol=0)


def test_selection_matters_when_topk_is_small():
    model = model_for(index_topk=4)
    ids, mask = batch(model.config, T=20)
    with torch.no_grad():
        dense = model(ids, attention=AttentionOptions(sparse=False)).logits
        sparse = model(ids).logits
    assert (dense - sparse).abs().max() > 1e-3


@pytest.mark.parametrize("sparse", [False, True])
def test_absorbed_equals_expanded(sparse):
    model = model_for(index_topk=6)
    ids, mask = batch(model.config)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, attention=AttentionOptions(sparse=sparse, form="absorbed")).logits
        e = model(ids, attention_mask=mask, attention=AttentionOptions(sparse=sparse, form="expanded")).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], e[real], atol=2e-5, rtol=0)


def _loss_and_grads(model, ids, mask, attention):
    model.zero_grad()
    logits = model(ids, attention_mask=mask, attention=attention).logits
    real = mask.bool()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][real[:, 1:]], ids[:, 1:][real[:, 1:]])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sparse_gather_equals_dense_reference_forward_and_backward():
    """The production path (absorbed, blocked gather, custom backward) against the expanded-form
    dense masked reference: same loss, same gradient for every parameter that gets one."""
    model = model_for(seed=3, index_topk=5)
    ids, mask = batch(model.config, T=18, seed=4)
    loss_a, grads_a = _loss_and_grads(model, ids, mask, AttentionOptions(sparse=True, form="absorbed",
                                                                          backend="torch"))
    loss_r, grads_r = _loss_and_grads(model, ids, mask, AttentionOptions(sparse=True, form="expanded"))
    torch.testing.assert_close(loss_a, loss_r, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_r.keys()
    # Every parameter outside the indexer learns from the LM loss; the indexer does not (docs/math.md §8).
    trainable = {n for n, _ in model.named_parameters()}
    assert {n for n in trainable if ".indexer." not in n} == set(grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_rows_do_not_leak():
    """Changing the tokens under the padding changes no real position's logits."""
    model = model_for(index_topk=4)
    ids, mask = batch(model.config)
    other = ids.clone()
    other[0, :5] = 7
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 5:], b[0, 5:], atol=1e-6, rtol=0)


def test_window_and_sink_are_forced_into_every_set():
    model = model_for(index_topk=3, index_window=2, index_sink=1)
    ids, mask = batch(model.config, T=16)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, records=Records(record_indices=True))
    for layer, idx in out.indices.items():
        assert idx.shape[-1] == 2 + 1 + 3
        for b in range(2):
            first = int(mask[b].argmax())
            for t in range(first, 16):
                chosen = [int(s) for s in idx[b, t] if s >= 0]
                assert len(chosen) == len(set(chosen)), "a slot was selected twice"
                assert t in chosen and (t - 1 < first or t - 1 in chosen)
                assert first in chosen
                assert all(first <= s <= t for s in chosen)
                assert len(chosen) == min(t - first + 1, 6)


def test_masked_path_selects_a_set_and_equals_the_reference(monkeypatch):
    """In training on CPU with few heads, "auto" attends by the masked path, which reads the
    selection as a set: the selector is asked for an unordered top-k (no sort of the winners),
    unless the indices are recorded. Loss and gradients equal the dense masked reference."""
    from dsv32 import kernels
    asked = []
    real = kernels.select_topk

    def spy(*args, **kw):
        asked.append(kw["ordered"])
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "select_topk", spy)
    model = model_for(seed=5, index_topk=5)
    ids, mask = batch(model.config, T=18, seed=6)
    loss_m, grads_m = _loss_and_grads(model, ids, mask, AttentionOptions(sparse=True, form="absorbed"))
    assert asked and not any(asked)
    loss_r, grads_r = _loss_and_grads(model, ids, mask, AttentionOptions(sparse=True, form="expanded"))
    torch.testing.assert_close(loss_m, loss_r, atol=1e-6, rtol=0)
    assert grads_m.keys() == grads_r.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_m[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
    asked.clear()
    model(ids, attention_mask=mask, attention=AttentionOptions(sparse=True, form="absorbed"),
          records=Records(record_indices=True))
    assert asked and all(asked)
    asked.clear()
    with torch.no_grad():                                 # no gradients: the gather kernel, ordered
        model(ids, attention_mask=mask, attention=AttentionOptions(sparse=True, form="absorbed"))
    assert asked and all(asked)
