"""The MQAR recall study (dsv32.training.recall_study) for a dense Llama-architecture GQA model
with the indexer retrofitted after dense training: the curriculum advances, the retrofit keeps
the dense weights, the warm-up trains only the indexer, the rows carry every score per layer,
and the GQA model's needle / recall scores agree with the selection its sparse forward records.
The benchmark's `quality --quick` smoke run is in tests/test_retrofit_benchmark.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv32 import AttentionOptions
from dsv32.model import Records
from dsv32.model.gqa import GQAForCausalLM
from dsv32.tasks.mqar import needle_positions
from dsv32.training.evaluate import mqar_eval
from dsv32.training.recall_study import RecallStudy, StudySizes

TINY = StudySizes(family="llama", seq_len=64, num_pairs=4, vocab_size=32, hidden=32, heads=4, kv_heads=2,
                  batch_size=2, dense_steps=4, check_every=1, curriculum=((16, 2), (32, 2)), stage_target=0.0,
                  warmup_steps=2, sparse_steps=2, eval_examples=2, fractions=(8, 16))


def test_llama_study_walks_the_curriculum_retrofits_and_scores_every_stage():
    study = RecallStudy(TINY, log=lambda line: None)
    result = study.run()
    # stage_target 0 advances at every check: one step per stage, then the final task
    assert [(t, n) for _, t, n, _ in result["dense_curve"]] == [(16, 2), (32, 2), (64, 4), (64, 4)]
    assert result["dense_final_stage"] and result["dense_steps_run"] == 4
    rows = result["rows"]
    # dense and dense continued (continue_dense, on by default) at T and 2T; three sparse stages x two k x two lengths
    assert len(rows) == 2 + 2 + 3 * 2 * 2
    assert {(r["length"], r["k"]) for r in rows if r["stage"] == "dense"} == {(64, None), (128, None)}
    for stage in ("sparse, untrained indexer (control)", "sparse, after warm-up", "sparse, after sparse training"):
        got = {(r["length"], r["k"]) for r in rows if r["stage"] == stage}
        assert got == {(64, 8), (64, 4), (128, 16), (128, 8)}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["answer_nll"] > 0
        assert r["answers"] == TINY.eval_examples * TINY.num_pairs
        if r["k"] is not None:
            for key in ("needle_selected/layer0", "needle_selected/layer1", "indexer_recall/layer0",
                        "indexer_recall/layer1"):
                assert 0.0 <= r[key] <= 1.0, key
    assert set(result["step_s"]) == {"dense_train", "warmup_train", "sparse_train"}
    assert set(result["fwd_bwd_s"]) == {"dense", "sparse"}

    models = study.models
    assert all(isinstance(m, GQAForCausalLM) for m in models.values())
    assert models["dense"].config.indexer is None                              # trained with no indexer
    assert models["control"].config.indexer.topk == TINY.seq_len // 8
    dense_state, control_state = models["dense"].state_dict(), models["control"].state_dict()
    assert all(torch.equal(v, control_state[k]) for k, v in dense_state.items())    # the retrofit keeps weights
    warm_state = models["warm"].state_dict()
    changed = {k for k, v in warm_state.items() if not torch.equal(v, control_state[k])}
    assert changed and all(".indexer." in k for k in changed)                  # stage 1 trains the indexer only
    sparse_state = models["sparse"].state_dict()
    assert any(not torch.equal(v, warm_state[k]) for k, v in sparse_state.items() if ".indexer." not in k)


def _retrofitted(seed: int = 0) -> GQAForCausalLM:
    sizes = replace(TINY, seed=seed)
    model = sizes.retrofit(sizes.build())
    for layer in model.model.layers:                      # an indexer that is not a copy of the attention
        layer.self_attn.indexer.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("k", [4, 8])
def test_gqa_needle_selected_is_what_the_sparse_forward_selects(k):
    model = _retrofitted()
    ids, labels = TINY.task().batch(torch.Generator().manual_seed(1), 3)
    attention = AttentionOptions(sparse=True, topk=k)
    scores = mqar_eval(model, ids, labels, TINY.num_pairs, attention=attention)
    with torch.no_grad():
        used = model(ids, attention=attention, records=Records(record_indices=True)).records.indices
    need = needle_positions(ids, labels, TINY.num_pairs)
    rows, pos = (need[:, 1:] >= 0).nonzero(as_tuple=True)
    needle = need[rows, pos + 1]
    for layer, idx in used.items():
        held = (idx[rows, pos] == needle[:, None]).any(-1).float().mean()
        assert scores[f"needle_selected/layer{layer}"] == pytest.approx(float(held))
    assert 0.0 < scores["indexer_recall"] < 1.0


def test_gqa_selection_of_every_key_holds_all_the_mass_and_every_needle():
    model = _retrofitted(seed=2)
    ids, labels = TINY.task().batch(torch.Generator().manual_seed(2), 2)
    scores = mqar_eval(model, ids, labels, TINY.num_pairs, attention=AttentionOptions(sparse=True, topk=TINY.seq_len))
    assert scores["needle_selected"] == 1.0
    assert scores["indexer_recall"] == pytest.approx(1.0, abs=1e-5)
    dense = mqar_eval(model, ids, labels, TINY.num_pairs, attention=AttentionOptions(sparse=False), selection=False)
    assert scores["answer_nll"] == pytest.approx(dense["answer_nll"], rel=1e-5)   # k >= T is dense attention


@pytest.mark.parametrize("changes,message", [
    (dict(family="gpt2"), "family must be one of"),
    (dict(family="llama", heads=4, kv_heads=3), "kv_heads must be a positive int dividing heads=4"),
    (dict(hidden=30, heads=4), "hidden=30 must be a multiple of heads=4"),
])
def test_study_sizes_name_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=message):
        StudySizes(**changes)
