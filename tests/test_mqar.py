"""MQAR (dsv32.tasks.mqar): the construction of docs/math.md's definition, answers recoverable
from the prompt, no repeated keys, impossible settings named, accuracy on a constructed case,
and a resumable data source."""

from __future__ import annotations

import json

import pytest
import torch

from dsv32.tasks.mqar import MQAR, MQARSequences, answer_accuracy, needle_positions


def _batch(task: MQAR, n: int = 8, seed: int = 0):
    return task.batch(torch.Generator().manual_seed(seed), n)


@pytest.mark.parametrize("task", [MQAR(vocab_size=64, num_pairs=8, seq_len=64),
                                  MQAR(vocab_size=40, num_pairs=16, seq_len=100, power_a=1.0, random_fill=False),
                                  MQAR(vocab_size=256, num_pairs=64, seq_len=1024),
                                  MQAR(vocab_size=64, num_pairs=8, seq_len=64, show_answers=True)])
def test_answers_are_recoverable_from_the_prompt_and_keys_do_not_repeat(task):
    ids, labels = _batch(task)
    N, half = task.num_pairs, task.vocab_size // 2
    assert ids.shape == labels.shape == (8, task.seq_len) and ids.max() < task.vocab_size
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:2 * N:2], row[1:2 * N:2]
        assert len(set(keys)) == N and all(1 <= k < half for k in keys)
        assert len(set(values)) == N and all(half <= v < task.vocab_size for v in values)
        answer = dict(zip(keys, values))
        answered = [t for t, y in enumerate(lab) if y != -100]
        assert len(answered) == N
        for t in answered:                        # the answer is the value that followed the query's key
            assert lab[t] == answer[row[t - 1]] and t >= 2 * N + 1 and (t - 2 * N) % 2 == 1
            assert (row[t] == lab[t]) == task.show_answers   # hidden: the ids hold each value once, in its pair
        if not task.show_answers:
            assert all(row.count(v) == 1 for v in values)
        queried = [row[t - 1] for t in answered]
        assert sorted(queried) == sorted(keys)    # every key queried once
        rest = row[2 * N:]
        for k in keys:                            # a key appears once in the context, once as its query
            assert rest.count(k) == 1
        filler = [x for t, x in enumerate(rest, 2 * N) if lab[t] == -100 and (t + 1 >= len(lab) or lab[t + 1] == -100)]
        assert all(x == 0 for x in filler) if not task.random_fill else all(1 <= x < half for x in filler)


def test_power_law_puts_queries_near_the_pairs_and_repeated_values_when_asked():
    near = _batch(MQAR(vocab_size=256, num_pairs=8, seq_len=512, power_a=0.01), n=64)
    flat = _batch(MQAR(vocab_size=256, num_pairs=8, seq_len=512, power_a=1.0), n=64)
    mean_pos = [float((lab != -100).nonzero()[:, 1].float().mean()) for _, lab in (near, flat)]
    assert mean_pos[0] < mean_pos[1] - 50
    ids, _ = _batch(MQAR(vocab_size=12, num_pairs=5, seq_len=20, random_fill=False, distinct_values=False), n=64)
    assert any(len(set(r[1:10:2])) < 5 for r in ids.tolist())


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=64, num_pairs=40), "num_pairs=40 needs as many distinct keys.*vocab_size must be >= 82"),
    (dict(vocab_size=256, num_pairs=64, seq_len=200), r"seq_len must be >= 4 \* num_pairs = 256"),
    (dict(power_a=0.0), "power_a must be a number > 0"),
    (dict(vocab_size=20, num_pairs=9, seq_len=64), "random_fill draws filler from the unused keys"),
    (dict(num_pairs=0), "num_pairs must be"),
])
def test_impossible_settings_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQAR(**kwargs)


def test_accuracy_nll_and_needles_on_a_constructed_case():
    ids = torch.tensor([[3, 7, 4, 8, 0, 4, 8, 3, 7]])                      # pairs 3->7, 4->8; queries 4, 3
    labels = torch.tensor([[-100, -100, -100, -100, -100, -100, 8, -100, 7]])
    assert needle_positions(ids, labels, 2).tolist() == [[-1, -1, -1, -1, -1, -1, 3, -1, 1]]
    logits = torch.zeros(1, 9, 10)
    logits[0, 5, 8] = 10.0                                                    # right: predicts 8 after query 4
    logits[0, 7, 2] = 10.0                                                    # wrong: predicts 2 after query 3
    out = answer_accuracy(logits, labels)
    assert out["accuracy"] == 0.5 and out["exact_match"] == 0.0 and out["answers"] == 2
    expected = -(torch.log_softmax(logits[0, 5], -1)[8] + torch.log_softmax(logits[0, 7], -1)[7]) / 2
    assert out["answer_nll"] == pytest.approx(float(expected))


def test_data_source_is_deterministic_resumable_and_cycles_lengths():
    task = MQAR(vocab_size=64, num_pairs=4, seq_len=32)
    a = MQARSequences(task, seed=3, lengths=(32, 48))
    first, second = a.next_batch(2), a.next_batch(2)
    assert first.ids.shape == (2, 32) and second.ids.shape == (2, 48)
    state = json.loads(json.dumps(a.state_dict()))
    third = a.next_batch(2)
    b = MQARSequences(task, seed=3, lengths=(32, 48))
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(2).ids, third.ids)
    with pytest.raises(ValueError, match="seed=3 but this task has seed=4"):
        MQARSequences(task, seed=4, lengths=(32, 48)).load_state_dict(state)


def test_curriculum_keeps_tokens_per_batch_advances_and_resumes():
    task = MQAR(vocab_size=64, num_pairs=8, seq_len=128)
    a = MQARSequences(task, seed=1, stages=((32, 2), (64, 4), (128, 8)))
    first = a.next_batch(2)
    assert first.ids.shape == (8, 32) and int((first.labels != -100).sum()) == 8 * 2   # 2 x 128 tokens, 2 answers each
    assert a.advance() and a.current.num_pairs == 4 and a.next_batch(2).ids.shape == (4, 64)
    state = json.loads(json.dumps(a.state_dict()))
    assert a.advance() and not a.advance() and a.last_stage                            # stops at the final task
    final = a.next_batch(2)
    assert final.ids.shape == (2, 128) and int((final.labels != -100).sum()) == 2 * 8
    b = MQARSequences(task, seed=1, stages=((32, 2), (64, 4), (128, 8)))
    b.load_state_dict(state)                                                           # resumes inside stage 2
    assert b.current.seq_len == 64 and b.next_batch(2).ids.shape == (4, 64)
    with pytest.raises(ValueError, match="stages=.* but this task has stages="):
        MQARSequences(task, seed=1, stages=((64, 4), (128, 8))).load_state_dict(state)


@pytest.mark.parametrize("stages,message", [
    (((32, 2), (64, 4)), r"last stage must be the task's own \(seq_len, num_pairs\) = \(128, 8\), got \(64, 4\)"),
    (((32, 2.0), (128, 8)), r"stages\[0\] must be a pair \(seq_len, num_pairs\) of ints"),
    (((16, 8), (128, 8)), r"stages\[0\] = \(16, 8\): seq_len must be >= 4 \* num_pairs = 32"),
])
def test_curriculum_refuses_bad_stages(stages, message):
    with pytest.raises(ValueError, match=message):
        MQARSequences(MQAR(vocab_size=64, num_pairs=8, seq_len=128), stages=stages)


def test_recall_study_walks_the_curriculum_then_converts():
    from dsv32.training.recall_study import RecallStudy, StudySizes
    sizes = StudySizes(seq_len=64, num_pairs=4, vocab_size=32, hidden=32, batch_size=2, dense_steps=4, check_every=1,
                       curriculum=((16, 2), (32, 2)), stage_target=0.0, warmup_steps=1, sparse_steps=1,
                       eval_examples=2, fractions=(8,))
    result = RecallStudy(sizes, log=lambda line: None).run()
    # stage_target 0 advances at every check: one step per stage, then the final task
    assert [(t, n) for _, t, n, _ in result["dense_curve"]] == [(16, 2), (32, 2), (64, 4), (64, 4)]
    assert result["dense_final_stage"] and result["dense_steps_run"] == 4
    stages = {r["stage"] for r in result["rows"]}
    assert {"dense", "sparse, after sparse training", "dense, continued as long as sparse training"} <= stages and len(result["rows"]) == 10
