"""DSA conversion losses: chunked equals naive, gradients stay on their side, recall."""

from __future__ import annotations

import pytest
import torch

from dsv32 import AttentionOptions, DSV32ForCausalLM, Records
from dsv32.kernels import allowed_keys, index_scores
from dsv32.training.dsa import (IndexerWarmup, SparseTraining, attention_queries, indexer_sparse_loss,
                                indexer_warmup_loss, selected_mass, selection_report)
from dsv32.training.losses import lm_loss
from tests.conftest import tiny_model


def _layer_inputs(model, B=2, T=24, seed=0, pad=0):
    """A layer's normed input x, RoPE tables and a key_valid mask (left padding of `pad`)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(B, T, cfg.hidden_size, generator=gen)
    key_valid = None
    positions = torch.arange(T).expand(B, T)
    if pad:
        key_valid = torch.ones(B, T, dtype=torch.bool)
        key_valid[0, :pad] = False
        positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = model.rotary(positions)
    return x, cos, sin, key_valid


def _naive_warmup(mla, x, cos, sin, key_valid):
    """Expanded per-head attention over the full T x S, head-averaged, then the KL; no chunks."""
    c_q, q_n, q_r, latent = mla.project(x, cos, sin)
    k, _ = mla.expand(latent)
    q = torch.cat((q_n, q_r), -1)
    B, T = x.shape[:2]
    allowed = allowed_keys(T, torch.arange(T), key_valid).expand(B, T, T)
    real = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * mla.scale
    p = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1).mean(1)
    iq, iw = mla.indexer.queries(x, c_q, cos, sin)
    ik = mla.indexer.keys(x, cos, sin)
    log_q = torch.log_softmax(index_scores(iq, iw, ik).masked_fill(~allowed, float("-inf")), -1)
    total = 0.0
    for b in range(B):
        for t in range(T):
            if not real[b, t]:
                continue
            a = allowed[b, t]
            pt, lq = p[b, t][a], log_q[b, t][a]
            total = total + (pt * (pt.log() - lq)).sum()
    return total / real.sum()


@pytest.mark.parametrize("pad", [0, 5])
def test_warmup_loss_equals_naive_and_gradients_match(pad):
    model = tiny_model(seed=1)
    mla = model.model.layers[1].self_attn
    x, cos, sin, key_valid = _layer_inputs(model, pad=pad)
    naive = _naive_warmup(mla, x, cos, sin, key_valid)
    naive_grads = torch.autograd.grad(naive, list(mla.indexer.parameters()))

    c_q = mla.project(x, cos, sin)[0].detach()
    q, kv = attention_queries(mla, x, cos, sin)
    iq, iw = mla.indexer.queries(x, c_q, cos, sin)
    ik = mla.indexer.keys(x, cos, sin)
    # A budget of a few hundred bytes forces chunks of one to three queries.
    loss, metrics = indexer_warmup_loss(q, kv, mla.scale, iq, iw, ik, key_valid, chunk_budget_bytes=800)
    grads = torch.autograd.grad(loss, list(mla.indexer.parameters()))
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    assert metrics["indexer_kl"] == loss.detach()
    for g, ref in zip(grads, naive_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_sparse_loss_equals_naive_on_selected_set():
    model = tiny_model(seed=2)
    mla = model.model.layers[0].self_attn
    x, cos, sin, key_valid = _layer_inputs(model, T=20, pad=3)
    c_q, q_n, q_r, latent = mla.project(x, cos, sin)
    iq, iw = mla.indexer.queries(x, c_q, cos, sin)
    ik = mla.indexer.keys(x, cos, sin)
    indices = mla.indexer.select(iq, iw, ik, 0, key_valid)                  # (B, T, 6)
    q, kv = attention_queries(mla, x, cos, sin)
    loss, _ = indexer_sparse_loss(q, kv, mla.scale, iq, iw, ik, indices, key_valid, chunk_budget_bytes=500)

    k, _ = mla.expand(latent)
    scores = torch.einsum("bthd,bshd->bhts", torch.cat((q_n, q_r), -1), k) * mla.scale
    logits = index_scores(iq, iw, ik)
    total = 0.0
    B, T = indices.shape[:2]
    for b in range(B):
        for t in range(T):
            s = indices[b, t][indices[b, t] >= 0]
            if not key_valid[b, t] or len(s) == 0:
                continue
            p = torch.softmax(scores[b, :, t, s], -1).mean(0)
            log_q = torch.log_softmax(logits[b, t, s], -1)
            total = total + (p * (p.log() - log_q)).sum()
    torch.testing.assert_close(loss, total / key_valid.sum(), rtol=1e-5, atol=1e-6)


def test_selected_mass_is_one_when_everything_is_selected_and_matches_naive():
    model = tiny_model(seed=3)
    mla = model.model.layers[1].self_attn
    x, cos, sin, _ = _layer_inputs(model, B=1, T=16)
    q, kv = attention_queries(mla, x, cos, sin)
    everything = torch.arange(16).expand(1, 16, 16)
    everything = torch.where(everything <= torch.arange(16)[:, None], everything, -1)
    for mass in selected_mass(q, kv, mla.scale, everything):
        torch.testing.assert_close(mass, torch.ones(1, 16))
    first_two = torch.tensor([[[0, -1]] + [[0, 1]] * 15])
    p = torch.softmax((torch.einsum("bthc,bsc->bhts", q, kv) * mla.scale)
                      .masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf")), -1).mean(1)
    mass, ceiling = selected_mass(q, kv, mla.scale, first_two, chunk_budget_bytes=300)
    torch.testing.assert_close(mass, p[..., :2].sum(-1))
    torch.testing.assert_close(ceiling, p.topk(2, -1).values.sum(-1))


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_gradients_stay_on_their_side():
    model = tiny_model(seed=4, index_topk=5)
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    # LM loss alone, sparse attention: nothing reaches an indexer.
    out = model(ids, attention=AttentionOptions(sparse=True))
    lm_loss(out.logits, ids)[0].backward()
    lm_only = _grads(model)
    assert all(g is None for n, g in lm_only.items() if ".indexer." in n)
    assert all(g is not None for n, g in lm_only.items() if ".indexer." not in n and "mtp" not in n)

    # Stage 2 with the indexer loss: the main model's gradients are exactly the LM ones.
    model.zero_grad(set_to_none=True)
    SparseTraining(indexer_weight=1.0)(model, ids).loss.backward()
    both = _grads(model)
    for name, g in both.items():
        if ".indexer." in name:
            assert g is not None and g.abs().sum() > 0, name
        else:
            torch.testing.assert_close(g, lm_only[name], rtol=0, atol=0)

    # Stage 1: only indexer parameters get a gradient.
    model.zero_grad(set_to_none=True)
    IndexerWarmup()(model, ids).loss.backward()
    for name, g in _grads(model).items():
        assert (g is not None) == (".indexer." in name), name


def test_selection_report_recall_in_unit_interval_and_one_when_topk_covers_all():
    model = tiny_model(seed=5, index_topk=64)
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    report = selection_report(model, ids, attention=AttentionOptions(sparse=False))
    assert report.recall(64)["indexer_recall"] == pytest.approx(1.0, abs=1e-5)
    small = tiny_model(seed=5, index_topk=4)
    rec = selection_report(small, ids, attention=AttentionOptions(sparse=True)).recall(4)
    assert 0.0 < rec["indexer_recall_past_k"] < rec["indexer_recall"] < rec["indexer_recall_ceiling"] < 1.0


def test_mtp_indexers_train_in_both_stages():
    """With an MTP layer, the warm-up loss gains that layer's term -- equal to the naive loss on
    the MTP layer's own (depth-shifted) input -- and stage 2 trains its indexer too, while the
    MTP layer's other weights get no gradient unless mtp_weight > 0."""
    model = tiny_model(seed=6, num_nextn_predict_layers=1, index_topk=5)
    cfg = model.config
    mtp_idx = cfg.num_hidden_layers
    ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))

    step = IndexerWarmup()(model, ids)
    assert f"indexer_kl/layer{mtp_idx}" in step.metrics
    with torch.no_grad():
        out = model(ids, attention=AttentionOptions(sparse=False), records=Records(keep_indexer_inputs=True),
                    compute_mtp=True)
    kept = out.records.indexer_inputs[mtp_idx]
    assert kept.x.shape[1] == 23                       # the MTP layer sees positions 1..23
    naive = _naive_warmup(model.mtp[0].self_attn, kept.x, kept.cos, kept.sin, kept.key_valid)
    torch.testing.assert_close(step.metrics[f"indexer_kl/layer{mtp_idx}"], naive.detach(), rtol=1e-5, atol=1e-6)
    step.loss.backward()
    for name, g in _grads(model).items():
        assert (g is not None) == (".indexer." in name), name
    assert model.mtp[0].self_attn.indexer.wk.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    SparseTraining(indexer_weight=1.0)(model, ids).loss.backward()
    grads = _grads(model)
    assert grads["mtp.0.self_attn.indexer.wk.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("mtp.") and ".indexer." not in n)
