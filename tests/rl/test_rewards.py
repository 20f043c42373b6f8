"""Rewards: built-in task rewards, failures scored and counted (warned once per kind, tallied per
function), a reward that fails on every sample stops the run with its name; with a time limit the
calls run in a worker process, a call that never returns is a failure and the worker is replaced.
No test here depends on the machine's speed: the calls that overrun block forever, and the
others finish in microseconds against limits of seconds."""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch

from dsv32.rl import (GRPOConfig, RewardError, RewardScorer, RewardWarning, is_correct, load_reward,
                      task_reward, train_grpo)
from dsv32.tasks import Example
from tests.rl.helpers import TOKENIZER, arithmetic, digit_reward, tiny_policy

EX = Example("Question: What is 2 + 3?\nAnswer: ", "5", {"task": "arithmetic"})


def test_task_rewards_are_exact_match():
    reward = task_reward("arithmetic")
    assert reward.__name__ == "arithmetic_exact"
    assert reward(EX.prompt, " 5\n", EX) == 1.0
    assert reward(EX.prompt, "5 apples", EX) == 0.0
    assert is_correct(EX, "5") and not is_correct(EX, "6")
    assert is_correct(Example("p", "x"), "x")                  # no task: plain exact match
    countdown = Example("...", "2 * 3", {"task": "countdown", "numbers": [2, 3, 4], "target": 6})
    assert task_reward("countdown")("", "3 * 2", countdown) == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        task_reward("chess")


def test_load_reward_specs():
    assert load_reward("task:passkey").__name__ == "passkey_exact"
    assert load_reward("math:hypot") is math.hypot
    for bad in ("nocolon", "no_such_module_xyz:f", "math:no_such_function"):
        with pytest.raises(ValueError, match="reward"):
            load_reward(bad)


def _flaky(prompt, completion, example):
    if completion == "raise":
        raise ZeroDivisionError("boom")
    if completion == "key":
        raise KeyError("missing")
    return {"nan": math.nan, "inf": math.inf, "str": "1.0", "none": None}.get(completion, 1.0)


def test_failures_are_scored_counted_and_warned_once_per_kind():
    scorer = RewardScorer([_flaky], failure_value=-1.0)
    completions = ["ok", "raise", "raise", "key", "nan", "inf", "str", "none", "ok"]
    with pytest.warns(RewardWarning) as caught:
        scores = scorer([""] * 9, completions, [EX] * 9)
    assert scores.rewards.tolist() == [1.0] + [-1.0] * 7 + [1.0]
    assert scores.failures == 7
    messages = [str(w.message) for w in caught]
    assert len(messages) == 6                                  # "raise" twice: one warning
    assert any("ZeroDivisionError: boom" in m for m in messages) and any("KeyError" in m for m in messages)
    assert any("NaN" in m for m in messages) and any("returned str" in m for m in messages)
    assert all("'_flaky'" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # the same kinds again: counted, not warned
        assert scorer([""] * 3, ["raise", "nan", "ok"], [EX] * 3).failures == 2


def test_rewards_are_summed_and_kept_per_function():
    scores = RewardScorer([task_reward("arithmetic"), lambda p, c, e: 0.5, lambda p, c, e: True])(
        [EX.prompt] * 2, ["5", "4"], [EX] * 2)
    assert scores.rewards.tolist() == [2.5, 1.5]
    assert set(scores.per_function) == {"arithmetic_exact", "<lambda>#1", "<lambda>#2"}


def test_a_reward_failing_on_every_sample_stops_with_its_name():
    def broken_reward(prompt, completion, example):
        return completion["x"]

    scorer = RewardScorer([task_reward("arithmetic"), broken_reward])
    with pytest.warns(RewardWarning), pytest.raises(RewardError, match="broken_reward.*all 3 samples.*TypeError"):
        scorer([""] * 3, ["5"] * 3, [EX] * 3)


def test_bad_scorer_arguments():
    with pytest.raises(ValueError, match="at least one"):
        RewardScorer([])
    with pytest.raises(TypeError, match="callables"):
        RewardScorer([1.0])
    with pytest.raises(ValueError, match="failure_value"):
        RewardScorer(task_reward("arithmetic"), failure_value=math.nan)


def test_the_loop_reports_failures_and_stops_on_a_broken_reward(tmp_path):
    calls = []

    def sometimes(prompt, completion, example):
        calls.append(completion)
        if len(calls) % 3 == 0:
            raise RuntimeError("flaky verifier")
        return 1.0

    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=3, max_new_tokens=2, lr=1e-3)
    with pytest.warns(RewardWarning, match="flaky verifier"):
        history = train_grpo(tiny_policy(), TOKENIZER, arithmetic(4), config, reward_fns=sometimes,
                             show_progress=False)
    assert history[0]["reward_failures"] == 2 and history[0]["reward_mean"] == pytest.approx(4 / 6)

    def always_broken(prompt, completion, example):
        raise ValueError("no verifier")

    policy = tiny_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.warns(RewardWarning), pytest.raises(RewardError, match="always_broken"):
        train_grpo(policy, TOKENIZER, arithmetic(4), config, reward_fns=[always_broken], out_dir=tmp_path,
                   show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())     # no update happened


# Module-level, so that they pickle into the reward worker.
def _blocks_on_hang(prompt, completion, example):
    if completion == "hang":
        threading.Event().wait()                               # never set: the call never returns
    return 1.0


def _huge(prompt, completion, example):
    return {"1e308": 1e308, "-1e39": -1e39, "int": 10 ** 400}.get(completion, 2.0)


@pytest.mark.parametrize("timeout", [None, 600.0])
def test_failures_are_the_same_in_process_and_in_the_worker(timeout):
    scorer = RewardScorer([_flaky, _huge], failure_value=-1.0, timeout=timeout)
    completions = ["ok", "raise", "nan", "inf", "str", "1e308", "-1e39", "int"]
    with pytest.warns(RewardWarning) as caught:
        scores = scorer([""] * 8, completions, [EX] * 8)
    scorer.close()
    assert scores.per_function["_flaky"].tolist() == [1.0] + [-1.0] * 4 + [1.0] * 3
    assert scores.per_function["_huge"].tolist() == [2.0] * 5 + [-1.0] * 3       # overflow: a failure, no crash
    assert scores.failures_by_function == {"_flaky": 4, "_huge": 3} and scores.failures == 7
    assert any("1e+308, beyond float32's range" in str(w.message) for w in caught)


def test_a_call_that_never_returns_is_a_failure_and_the_worker_is_replaced():
    scorer = RewardScorer([_blocks_on_hang, task_reward("arithmetic")], timeout=2.0)
    try:
        with pytest.warns(RewardWarning, match="'_blocks_on_hang' took longer than the 2 s limit"):
            scores = scorer([""] * 4, ["5", "hang", "6", "5"], [EX] * 4)
        assert scores.per_function["_blocks_on_hang"].tolist() == [1.0, 0.0, 1.0, 1.0]
        assert scores.per_function["arithmetic_exact"].tolist() == [1.0, 0.0, 0.0, 1.0]
        assert scores.failures_by_function == {"_blocks_on_hang": 1, "arithmetic_exact": 0}
        assert scorer.worker.restarts == 1
        assert scorer([""] * 2, ["5", "5"], [EX] * 2).failures == 0           # the new worker serves the next batch
        with pytest.raises(RewardError, match="'_blocks_on_hang' failed on all 1 samples.*2 s limit"):
            scorer([""], ["hang"], [EX])                                   # a whole batch timed out: stop
    finally:
        scorer.close()


def test_a_time_limit_needs_picklable_rewards_and_a_positive_number():
    with pytest.raises(ValueError, match="'<lambda>' is not"):
        RewardScorer([digit_reward, lambda p, c, e: 1.0], timeout=5)
    for bad in (0, -1.0, math.inf, math.nan, "5", True):
        with pytest.raises(ValueError, match="reward timeout"):
            RewardScorer(digit_reward, timeout=bad)
    with pytest.raises(ValueError, match="reward_timeout"):
        GRPOConfig(reward_timeout=0)


def test_grpo_with_a_time_limit_repeats_the_in_process_run_and_tallies_per_function():
    config = dict(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=3, lr=1e-3)
    runs = [train_grpo(tiny_policy(), TOKENIZER, arithmetic(4), GRPOConfig(**config, reward_timeout=limit),
                       reward_fns=[digit_reward, task_reward("arithmetic")], show_progress=False)
            for limit in (None, 600.0)]
    plain = [[{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in run] for run in runs]
    assert plain[0] == plain[1]
    assert plain[0][0]["reward_failures/digit_reward"] == 0 and "reward_failures/arithmetic_exact" in plain[0][0]
