"""Retrieval scoring by teacher forcing: the positions checked are exactly the answer and EOS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsv32 import AttentionOptions
from dsv32.tokenizer import ByteTokenizer
from dsv32.training.evaluate import accuracy_summary, retrieval_eval

TOK = ByteTokenizer()


class Oracle(nn.Module):
    """Predicts the true next token of whatever it reads (it peeks ahead), except that it never
    predicts the token `avoid` (byte 0 instead)."""

    def __init__(self, avoid: int | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(max_position_embeddings=100_000)
        self.avoid = avoid

    def forward(self, ids, attention=None, logits_to_keep=0):
        nxt = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
        if self.avoid is not None:
            nxt = torch.where(nxt == self.avoid, 0, nxt)
        logits = torch.nn.functional.one_hot(nxt, TOK.vocab_size).float() * 30.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _run(model, **kw):
    return retrieval_eval(model, TOK, tasks=["passkey"], lengths=[300], depths=[0.0, 1.0], examples_per_cell=3,
                          attention=AttentionOptions(sparse=False), **kw)


def test_a_model_that_predicts_every_answer_token_and_eos_scores_one():
    rows = _run(Oracle())
    assert [r["accuracy"] for r in rows] == [1.0, 1.0]
    assert all(r["token_accuracy"] == 1.0 and r["answer_nll"] < 1e-6 for r in rows)


def test_missing_the_terminator_fails_exact_match_only():
    rows = _run(Oracle(avoid=TOK.eos_id))
    summary = accuracy_summary(rows)
    assert summary["accuracy"] == 0.0
    assert summary["token_accuracy"] == pytest.approx(5 / 6)       # 5 key digits right, EOS wrong


def test_unknown_or_non_retrieval_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'passkee'"):
        retrieval_eval(Oracle(), TOK, tasks=["passkee"], lengths=[300], depths=[0.5], examples_per_cell=1,
                       attention=AttentionOptions())
    with pytest.raises(ValueError, match="is a reasoning task; retrieval tasks are"):
        retrieval_eval(Oracle(), TOK, tasks=["arithmetic"], lengths=[300], depths=[0.5], examples_per_cell=1,
                       attention=AttentionOptions())


def test_heatmaps_of_either_value(tmp_path):
    from dsv32.training.plots import plot_retrieval_heatmap
    rows = _run(Oracle(avoid=TOK.eos_id))
    for value in ("accuracy", "token_accuracy"):
        assert plot_retrieval_heatmap(rows, tmp_path / f"{value}.png", value=value).stat().st_size > 1000
    with pytest.raises(ValueError, match="value must be one of"):
        plot_retrieval_heatmap(rows, tmp_path / "x.png", value="recall")


def test_needle_selected_counts_the_share_of_needles_in_each_querys_top_k():
    from dsv32.training.evaluate import needle_selected
    indices = torch.full((1, 6, 2), -1)
    indices[0, 4] = torch.tensor([1, 3])          # query 4 keeps keys 1 and 3
    indices[0, 5] = torch.tensor([0, 2])          # query 5 keeps keys 0 and 2
    swapped = indices.clone()
    swapped[0, 4], swapped[0, 5] = indices[0, 5], indices[0, 4]
    report = SimpleNamespace(indices={0: indices, 1: swapped})
    rows, queries = torch.tensor([0, 0]), torch.tensor([4, 5])
    needles = torch.tensor([[1, 2], [2, -1]])     # query 4 needs keys 1, 2 (holds one); query 5 needs key 2 (holds it)
    out = needle_selected(None, None, rows, queries, needles, attention=AttentionOptions(), report=report)
    assert out["needle_selected/layer0"] == pytest.approx((0.5 + 1.0) / 2)
    # Layer 1's selections are swapped between the two queries: query 4 holds 0, 2; query 5 holds 1, 3.
    assert out["needle_selected/layer1"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["needle_selected"] == pytest.approx((0.75 + 0.25) / 2)


def test_mqar_eval_and_text_needles_run_on_a_model():
    from dsv32.tasks.mqar import MQAR
    from dsv32.training.evaluate import mqar_eval
    from tests.training.helpers import byte_model
    model = byte_model().eval()
    task = MQAR(vocab_size=64, num_pairs=4, seq_len=48)
    ids, labels = task.batch(torch.Generator().manual_seed(0), 3)
    out = mqar_eval(model, ids, labels, 4, attention=AttentionOptions(sparse=True, topk=8), batch_size=2)
    assert out["answers"] == 12 and 0 <= out["accuracy"] <= 1 and out["answer_nll"] > 0
    assert {"needle_selected/layer0", "needle_selected/layer1", "indexer_recall"} <= set(out)
    dense_k = mqar_eval(model, ids, labels, 4, attention=AttentionOptions(sparse=False, topk=48))
    assert dense_k["needle_selected"] == 1.0                    # every key fits in a top-48 of T=48
    rows = retrieval_eval(model, TOK, tasks=["passkey"], lengths=[260], depths=[0.5], examples_per_cell=1,
                          attention=AttentionOptions(sparse=False, topk=300), needles=True)
    assert rows[0]["needle_selected"] == 1.0 and "needle_selected" in accuracy_summary(rows)
