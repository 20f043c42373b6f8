"""The retrofitted GQA model under sparse attention: with k >= length the sparse machinery
(dense_shortcut off) equals dense attention, left padding included; the torch kernel path equals
the dense masked reference at a k that bites, logits and gradients of the main weights."""

from __future__ import annotations

import torch

from dsv32 import AttentionOptions
from dsv32.checkpoint.hf_dense import attach_indexer
from tests.conftest import randomize_
from tests.model.test_gqa_indexer import SPEC, dense_model


def retrofitted(seed=0):
    return randomize_(attach_indexer(dense_model(seed=seed), SPEC), seed=seed + 1).eval()


def batch():
    ids = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask


def test_topk_at_least_length_equals_dense():
    model = retrofitted()
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        dense = model(ids, mask, attention=AttentionOptions(sparse=False)).logits
        for backend in ("reference", "torch"):
            sparse = model(ids, mask, attention=AttentionOptions(topk=13, dense_shortcut=False,
                                                                 backend=backend)).logits
            torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=1e-5)


def test_torch_path_equals_reference_with_gradients():
    ids, mask = batch()
    results = []
    for backend in ("reference", "torch"):
        model = retrofitted(seed=4)
        model.train()
        out = model(ids, mask, attention=AttentionOptions(topk=3, backend=backend)).logits
        (out[mask.bool()].square().mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and not any(".indexer." in n for n in ga)     # LM loss never reaches it
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)
    sparse = results[0][0]
    with torch.no_grad():
        dense = retrofitted(seed=4)(ids, mask, attention=AttentionOptions(sparse=False)).logits
    assert (sparse - dense).abs().max() > 1e-3                                # k = 3 really drops keys
