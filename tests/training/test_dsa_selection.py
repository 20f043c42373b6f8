"""The DSA training stages select with the model's own selection function (`kernels.select_topk`
through `Indexer.select`, score descending, key slot ascending): a stage-2 step trains the
indexer on the keys an evaluation of the same batch attends to, and `selection_report` reports
those keys, at any per-call top-k."""

from __future__ import annotations

import pytest
import torch

from dsv32 import AttentionOptions, Records
from dsv32.training.dsa import SparseTraining, attention_queries, indexer_sparse_loss, selection_report
from tests.conftest import tiny_model


def _batch(T=20):
    return torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(4))


def _eval_selection(model, ids, topk=None, mtp=False):
    with torch.no_grad():
        return model(ids, attention=AttentionOptions(sparse=True, topk=topk), compute_mtp=mtp,
                     records=Records(record_indices=True, keep_indexer_inputs=True)).records


def _kl_on(model, records, indices):
    """Stage 2's indexer loss, summed over layers, on the given selections."""
    total = 0.0
    for block in [*model.model.layers, *model.mtp]:
        i = block.layer_idx
        kept, mla = records.indexer_inputs[i], block.self_attn
        iq, iw = mla.indexer.queries(kept.x, kept.c_q, kept.cos, kept.sin)
        ik = mla.indexer.keys(kept.x, kept.cos, kept.sin)
        q, kv = attention_queries(mla, kept.x, kept.cos, kept.sin)
        total += float(indexer_sparse_loss(q, kv, mla.scale, iq, iw, ik, indices[i], kept.key_valid)[0])
    return total


def test_a_sparse_training_step_trains_on_the_keys_an_evaluation_selects():
    model = tiny_model("tiny", seed=5, num_nextn_predict_layers=1)           # top-6 of up to 20 keys
    ids = _batch()
    ev = _eval_selection(model, ids, mtp=True)
    other = _eval_selection(model, ids, topk=3, mtp=True)
    assert sorted(ev.indices) == [0, 1, 2, 3]                                # the MTP layer too
    with torch.no_grad():
        step = SparseTraining()(model, ids)
        expected = _kl_on(model, ev, ev.indices)
        elsewhere = _kl_on(model, ev, {i: torch.nn.functional.pad(s, (0, 3), value=-1)
                                       for i, s in other.indices.items()})
    assert float(step.metrics["indexer_kl_selected"]) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert abs(elsewhere - expected) > 1e-3                                  # the selection matters


@pytest.mark.parametrize("topk", [None, 3])
def test_selection_report_selects_what_the_sparse_forward_selects(topk):
    model = tiny_model("tiny", seed=5).eval()
    ids = _batch()
    attention = AttentionOptions(sparse=True, topk=topk)
    report = selection_report(model, ids, attention=attention)
    ev = _eval_selection(model, ids, topk=topk)
    assert sorted(report.indices) == sorted(ev.indices)
    for i, idx in report.indices.items():
        assert idx.shape[-1] == (topk or model.config.index_topk)
        assert torch.equal(idx.to(torch.int32), ev.indices[i])
