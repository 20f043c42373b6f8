"""`dsv32.validation`: one sentence shape, naming the field and what is allowed, for every
config dataclass."""

from __future__ import annotations

import math

import pytest

from dsv32.config import ModelConfig
from dsv32.rl.grpo import GRPOConfig
from dsv32.rl.sft import SFTConfig
from dsv32.training.trainer import TrainConfig
from dsv32.validation import check_bool, check_choice, check_int, check_number, require


@pytest.mark.parametrize("call,message", [
    (lambda: check_int("steps", 0, 1), "steps must be an integer >= 1, got 0"),
    (lambda: check_int("digits", 31, 1, 30), r"digits must be an integer in \[1, 30\], got 31"),
    (lambda: check_int("steps", True, 1), "steps must be an integer >= 1, got True"),
    (lambda: check_int("steps", 2.0, 1), "steps must be an integer >= 1, got 2.0"),
    (lambda: check_number("lr", 0.0, 0, low_open=True), "lr must be a number > 0, got 0.0"),
    (lambda: check_number("lr", math.inf, 0, low_open=True), "lr must be a number > 0, got inf"),
    (lambda: check_number("top_p", 1.5, 0, 1, low_open=True, note="1 = off"),
     r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
    (lambda: check_number("reward", "x"), "reward must be a finite number, got 'x'"),
    (lambda: check_choice("schedule", "linear", ("cosine", "constant")),
     r"schedule must be one of \('cosine', 'constant'\), got 'linear'"),
    (lambda: check_bool("keep_routing", "yes"), "keep_routing must be true or false, got 'yes'"),
    (lambda: require(False, "minibatches", "<= 4", 9), "minibatches must be <= 4, got 9"),
])
def test_one_sentence_shape(call, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        call()


def test_accepted_values_pass():
    check_int("n", 5, 1, 5)
    check_number("x", 1, 0, 1)
    check_number("x", 0.5, 0, 1, low_open=True, high_open=True)
    check_choice("c", "a", "ab")
    check_bool("b", False)


@pytest.mark.parametrize("make,field", [
    (lambda: ModelConfig.preset("tiny", hidden_size=0), "config field 'hidden_size' must be an integer >= 1"),
    (lambda: ModelConfig.preset("tiny", attention_dropout=1.0), r"config field 'attention_dropout' must be in \[0, 1\)"),
    (lambda: TrainConfig(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (lambda: TrainConfig(lr=math.nan), "lr must be a number > 0"),
    (lambda: SFTConfig(schedule="linear"), "schedule must be one of"),
    (lambda: GRPOConfig(top_k=-1), "top_k must be an integer >= 0"),
])
def test_every_config_dataclass_speaks_the_same_way(make, field):
    with pytest.raises(ValueError, match=f"^{field}.*, got "):
        make()
