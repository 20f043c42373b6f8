"""Synthetic tasks: exact lengths, needle placement, answers that follow from the prompt,
strict scorers, a safe Countdown verifier, the registry and the pretraining mix."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32.tokenizer import ByteTokenizer
from dsv32.training.data import Document, PackedSequences
from dsv32.tasks import (TASKS, Example, MixedSequences, check_countdown, get_task, make_arithmetic,
                                  make_countdown, make_multikey_niah, make_passkey, make_variable_tracking,
                                  score_countdown, score_exact)
from dsv32.tasks.reasoning import MAX_EXPRESSION_CHARS, parse_expression
from dsv32.tasks.retrieval import MAX_PIECE_BYTES, SENTENCES

RETRIEVAL = {"passkey": make_passkey, "multikey_niah": make_multikey_niah,
             "variable_tracking": make_variable_tracking}
FAST = settings(max_examples=40, deadline=None)


def _min_length(make) -> int:
    with pytest.raises(ValueError, match=r"length_tokens must be >= (\d+)") as info:
        make(random.Random(0), 1)
    return int(re.search(r">= (\d+)", str(info.value)).group(1))


def _vt_value(prompt: str, variable: str) -> str:
    """Run the prompt's assignments in order, as a reader would, and return `variable`'s value."""
    env: dict[str, str] = {}
    for name, value in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", prompt):
        env[name] = env[value[4:]] if value.startswith("VAR ") else value
    return env[variable]


@pytest.mark.parametrize("name", sorted(RETRIEVAL))
@given(extra=st.integers(0, 3000), depth=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
@FAST
def test_retrieval_length_depth_and_answer(name, extra, depth, seed):
    make = RETRIEVAL[name]
    length = _min_length(make) + extra
    ex = make(random.Random(seed), length, depth)
    meta = ex.meta
    assert len(ex.prompt.encode("utf-8")) == length  # exact, no tolerance
    assert ex.prompt.endswith("\nAnswer: ")
    # The needle is where the meta says, and within half a filler piece of the asked depth.
    assert abs(meta["filler_offset"] - depth * meta["filler_bytes"]) <= MAX_PIECE_BYTES / 2
    at_needle = ex.prompt[meta["needle_offset"]:]
    if name == "passkey":
        assert at_needle.startswith(f"The pass key is {ex.answer}.")
        assert set(re.findall(r"\d+", ex.prompt)) == {ex.answer}  # filler holds no numbers
    elif name == "multikey_niah":
        assert at_needle.startswith(f"The special magic number for {meta['key']} is {ex.answer}.")
        found = dict(re.findall(r"magic number for ([a-z-]+) is (\d+)\.", ex.prompt))
        assert found == dict(zip(meta["keys"], meta["values"]))
        assert f"number for {meta['key']}?" in ex.prompt
    else:
        assert at_needle.startswith(f"VAR {meta['chain'][0]} = {ex.answer}.")
        assert _vt_value(ex.prompt, meta["variable"]) == ex.answer
        assert len(set(meta["values"])) == meta["num_chains"]  # distractors hold other numbers
    assert score_exact(ex, ex.answer) == 1.0


@pytest.mark.parametrize("name", sorted(RETRIEVAL))
def test_retrieval_depth_extremes_and_minimum(name):
    make = RETRIEVAL[name]
    low = _min_length(make)
    ex = make(random.Random(1), low, 0.7)  # the minimum itself works
    assert len(ex.prompt) == low
    # ... with no filler at all, except where key lengths vary and the minimum is a bound.
    assert ex.meta["filler_bytes"] == 0 or name == "multikey_niah"
    for depth, where in ((0.0, "start"), (1.0, "end")):
        ex = make(random.Random(2), 5000, depth)
        if where == "start":  # right after the instruction
            assert ex.meta["needle_offset"] == ex.prompt.index("\n\n") + 2
        else:  # nothing but needles between it and the question
            tail = ex.prompt[ex.meta["needle_offset"]:ex.prompt.rindex("\n\nQuestion:")]
            assert not any(s in tail for s in SENTENCES)


@pytest.mark.parametrize("name", sorted(RETRIEVAL))
def test_retrieval_deterministic_by_seed(name):
    make = RETRIEVAL[name]
    assert make(random.Random(5), 3000, 0.4) == make(random.Random(5), 3000, 0.4)
    assert make(random.Random(5), 3000, 0.4) != make(random.Random(6), 3000, 0.4)


def test_long_prompt_is_exact_and_natural():
    ex = make_passkey(random.Random(0), 32768, 0.5)
    assert len(ex.prompt) == 32768
    assert ex.prompt.isascii() and "  " not in ex.prompt[:-2000].replace("\n\n", "")
    assert all(s.isascii() and not re.search(r"\d|pass key|magic|VAR", s) for s in SENTENCES)


def test_retrieval_bad_arguments():
    rng = random.Random(0)
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        make_passkey(rng, 1000, 1.5)
    with pytest.raises(ValueError, match="length_tokens must be an integer >= 1"):
        make_passkey(rng, 0)
    with pytest.raises(ValueError, match="digits must be an integer in"):
        make_passkey(rng, 1000, digits=0)
    with pytest.raises(ValueError, match="num_keys"):
        make_multikey_niah(rng, 1000, num_keys=0)
    with pytest.raises(ValueError, match="hops"):
        make_variable_tracking(rng, 1000, hops=0)


def test_exact_scorer_tolerates_only_whitespace_and_eos():
    ex = Example("prompt", "12345")
    for good in ["12345", " 12345\n", "\n12345<|eos|>", "12345\n<|eos|>\n"]:
        assert score_exact(ex, good) == 1.0, good
    for bad in ["1234", "123456", "12345.", "Answer: 12345", "12345 12345", "12345\nmore", "", "<|eos|>"]:
        assert score_exact(ex, bad) == 0.0, bad


def test_arithmetic():
    rng = random.Random(0)
    for digits in (1, 3, 8):
        for _ in range(30):
            ex = make_arithmetic(rng, digits)
            a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
            assert len(str(a)) == len(str(b)) == digits
            assert ex.prompt == f"Question: What is {a} {op} {b}?\nAnswer: "
            assert int(ex.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert score_exact(ex, ex.answer + "\n") == 1.0
            assert score_exact(ex, str(int(ex.answer) + 1)) == 0.0
    assert {make_arithmetic(rng, 2, ops="*").meta["op"] for _ in range(10)} == {"*"}
    with pytest.raises(ValueError, match="ops must be"):
        make_arithmetic(rng, 2, ops="/")
    with pytest.raises(ValueError, match="digits must be"):
        make_arithmetic(rng, 0)


@given(seed=st.integers(0, 2**32), count=st.integers(2, 6))
@FAST
def test_countdown_puzzles_are_solvable(seed, count):
    ex = make_countdown(random.Random(seed), count)
    numbers, target = ex.meta["numbers"], ex.meta["target"]
    assert len(numbers) == count and 1 <= target <= 1000 and target not in numbers
    assert f"{numbers}" in ex.prompt and f"equals {target}." in ex.prompt
    assert score_countdown(ex, ex.answer) == 1.0
    assert score_countdown(ex, f" {ex.answer}\n<|eos|>") == 1.0


def test_countdown_verifier():
    ex = Example("p", "(25 - 5) * 4 + 3", {"numbers": [25, 5, 4, 3, 3], "target": 83})
    accepted = ["(25 - 5) * 4 + 3", "3 + 4*(25-5)", "((25-5)*4)+3", "25 * 3 + 5 + 3"]
    for expr in accepted:
        assert score_countdown(ex, expr) == 1.0, expr
    rejected = {
        "(25 - 5) * 4 + 4": "reuses 4",
        "(25 - 5) * 4 + 3 + 3 - 3": "uses 3 three times",
        "(25 - 6) * 4 + 7": "numbers not given",
        "(25 - 5) * 4": "wrong result",
        "83": "not a given number",
        "(25 - 5) * 4 + 3 = 83": "trailing equation",
        "__import__('os').system('echo hacked')": "names and calls",
        "3 ** 4": "exponentiation",
        "-3 + 4": "unary minus",
        "(25 - 5) * 4 + 3)": "unbalanced",
        "((25 - 5) * 4 + 3": "unbalanced",
        "25 / (5 - 5) + 83": "division by zero",
        "(２5 - 5) * 4 + 3": "full-width digit",
        "(٢5 - 5) * 4 + 3": "Arabic-Indic digit",
        "": "empty",
    }
    for expr, why in rejected.items():
        assert score_countdown(ex, expr) == 0.0, why
    deep = "(" * 40 + "3" + ")" * 40
    assert check_countdown(deep, [3], 3) is False
    long = "+".join(["3"] * (MAX_EXPRESSION_CHARS // 2 + 1))
    assert check_countdown(long, [3] * 200, 3 * (MAX_EXPRESSION_CHARS // 2 + 1)) is False
    assert check_countdown("7 / 2 * 2", [7, 2, 2], 7) is True  # exact fractions in between
    with pytest.raises(ValueError, match="unexpected character '_'"):
        parse_expression("__import__('os')")


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None)
def test_countdown_verifier_never_raises(text):
    assert check_countdown(text, [1, 2, 3, 4], 10) in (True, False)


def test_registry():
    assert sorted(TASKS) == ["arithmetic", "countdown", "multikey_niah", "passkey", "variable_tracking"]
    for name, task in TASKS.items():
        assert get_task(name) is task
        rng = random.Random(0)
        ex = task.make_example(rng, 2000, 0.5) if task.kind == "retrieval" else task.make_example(rng)
        assert ex.meta["task"] == name
        assert task.score(ex, ex.answer) == 1.0
    with pytest.raises(ValueError, match=r"unknown task 'nope'; choose one of \['arithmetic', 'countdown'"):
        get_task("nope")


# ----------------------------------------------------------------------------- pretraining mix
HEADERS = ("A pass key", "Special magic numbers", "Variable assignments")


def _mix(seq_len=1024, seed=0, **kwargs):
    tok = ByteTokenizer()
    docs = [Document(f"d{i}", f"corpus document {i}. " * (20 + i)) for i in range(12)]
    corpus = PackedSequences(docs, tok, seq_len, seed=3)
    return MixedSequences(corpus, tok, seed=seed, **kwargs), docs


def test_mix_keeps_corpus_stream_and_fills_sequences():
    tok = ByteTokenizer()
    mixed, docs = _mix(task_fraction=0.5)
    batch = mixed.next_batch(40)
    assert batch.shape == (40, 1024) and not (batch == tok.pad_id).any()
    corpus_part: list[int] = []
    examples = 0
    for row in batch.tolist():
        text = tok.decode(row)
        if text.startswith(HEADERS):
            examples += 1
            eos = row.index(tok.eos_id)
            assert eos >= 1024 - 40  # the example fills all but a few positions
            assert re.search(r"\nAnswer: \d+$", tok.decode(row[:eos]))
            corpus_part += row[eos + 1:]
        else:
            corpus_part += row
    assert 10 <= examples <= 30
    fresh = PackedSequences(docs, tok, 1024, seed=3)
    assert corpus_part == fresh.take(len(corpus_part)).tolist()  # corpus consumed in order, none lost


def test_mix_resume_and_determinism():
    a, _ = _mix(task_fraction=0.4, seed=7)
    b, _ = _mix(task_fraction=0.4, seed=7)
    a.next_batch(5)
    state = json.loads(json.dumps(a.state_dict()))
    rest = a.next_batch(8)
    assert torch.equal(b.next_batch(5), _mix(task_fraction=0.4, seed=7)[0].next_batch(5))
    c, _ = _mix(task_fraction=0.4, seed=7)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch(8), rest)
    d, _ = _mix(task_fraction=0.4, seed=8)
    with pytest.raises(ValueError, match="seed=7 but this mix has seed=8"):
        d.load_state_dict(state)


def test_mix_bad_arguments():
    with pytest.raises(ValueError, match="too short for task 'variable_tracking'"):
        _mix(seq_len=256, tasks=["variable_tracking"])
    with pytest.raises(ValueError, match="retrieval tasks from"):
        _mix(tasks=["countdown"])
    with pytest.raises(ValueError, match="task_fraction"):
        _mix(task_fraction=1.5)
    with pytest.raises(ValueError, match="does not take"):
        _mix(tasks=["passkey"], task_options={"passkey": {"hops": 3}})
    with pytest.raises(ValueError, match="task_options names tasks not in"):
        _mix(tasks=["passkey"], task_options={"variable_tracking": {"hops": 3}})
    mixed, _ = _mix(tasks=["variable_tracking"], task_options={"variable_tracking": {"hops": 2}},
                    task_fraction=1.0)
    assert ByteTokenizer().decode(mixed.next_batch(1)[0].tolist()).startswith("Variable assignments")


def test_mix_answer_only_labels_train_the_answer_and_the_corpus():
    tok = ByteTokenizer()
    mixed, _ = _mix(task_fraction=0.5, task_loss="answer", seed=1)
    plain, _ = _mix(task_fraction=0.5, seed=1)
    ids, labels = mixed.next_batch(12)
    assert torch.equal(ids, plain.next_batch(12))              # same rows; only the labels differ
    tasks = 0
    for row, lab in zip(ids.tolist(), labels.tolist()):
        if not tok.decode(row).startswith(HEADERS):
            assert lab == row                                  # corpus: every token
            continue
        tasks += 1
        eos = row.index(tok.eos_id)
        trained = [i for i, y in enumerate(lab) if y != -100]
        answer = re.search(r"\nAnswer: (\d+)$", tok.decode(row[:eos])).group(1)
        first = eos - len(answer)
        assert trained == list(range(first, len(row)))         # answer, EOS, then the corpus top-up
        assert tok.decode(row[first:eos]) == answer
    assert tasks >= 2


def test_mix_length_range_draws_prompt_lengths():
    tok = ByteTokenizer()
    mixed, _ = _mix(task_fraction=1.0, tasks=["passkey"], length_range=(300, 600))
    lengths = {tok.decode(row.tolist()).index("Answer: ") + len("Answer: ") for row in mixed.next_batch(8)}
    assert len(lengths) > 1 and all(300 <= n <= 600 for n in lengths)
    with pytest.raises(ValueError, match="length_range must be"):
        _mix(length_range=(10, 5000))
    with pytest.raises(ValueError, match="task_loss must be one of"):
        _mix(task_loss="prompt")
