"""`dsv32 sft` and `dsv32 grpo` end to end at tiny sizes, resuming from --out (a SIGKILLed SFT run
resumes onto the uninterrupted loss curve), and bad input reported in one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsv32
from dsv32.cli import main
from dsv32.rl import RewardWarning, read_metrics
from tests.killing import sigkill, wait_for
from tests.rl.helpers import same_weights

ROOT = Path(__file__).resolve().parents[2]

DATA = ["--task", "arithmetic", "--task-options", '{"digits": 1}', "--train-size", "12", "--eval-size", "4"]
TINY_GRPO = {"prompts_per_step": 2, "group_size": 3, "max_new_tokens": 3, "top_p": 0.9, "lr": 1e-3,
             "ppo_epochs": 2, "minibatches": 2}


def always_raises(prompt, completion, example):
    raise LookupError("verifier offline")


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    assert main(["sft", "--model", "tiny", "--out", str(out), *DATA, "--steps", "3", "--batch-size", "4"]) == 0
    return out


def test_sft_writes_a_loadable_checkpoint_and_metrics(sft_model, capsys):
    assert (sft_model / "config.json").is_file() and len(read_metrics(sft_model / "sft_metrics.jsonl")) == 3


def test_grpo_from_a_config_file_then_resume(sft_model, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "grpo.json"
    config.write_text(json.dumps({"model": str(sft_model), "out": str(out), "steps": 2, "eval_every": 2,
                                  "delta": None, "task_options": {"digits": 1}, "train_size": 12, "eval_size": 4,
                                  **TINY_GRPO}))
    assert main(["grpo", "--config", str(config)]) == 0
    assert "held-out greedy accuracy" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "curves.png").is_file() and (out / "checkpoints" / "checkpoint-00000002" / "policy" /
                                               "config.json").is_file()
    # A changed stabiliser would continue the old run with other maths: refused, naming it.
    assert "grpo.keep_routing: True vs False" in _error(capsys, ["grpo", "--config", str(config), "--steps", "3",
                                                                 "--no-keep-routing"])
    assert main(["grpo", "--config", str(config), "--steps", "3", "--eval-every", "3"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-00000003"]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsv32: error:")
    return err


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "group_size must be an integer >= 2"),
    (["--delta", "0"], "delta must be > 0"),
    (["--delta", "-0.5"], "delta must be > 0"),
    (["--eps-low", "1.2"], "eps_low must be in (0, 1)"),
    (["--eps-high", "0"], "eps_high must be in (0, 1)"),
    (["--train-size", "0"], "dataset is empty"),
    (["--task", "chess"], "unknown task 'chess'"),
    (["--kl-estimator", "k2"], "invalid choice: 'k2'"),
    (["--task-options", "[1]"], "expected a JSON object"),
    (["--reward", "nocolon"], "reward must be"),
])
def test_bad_grpo_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
    err = _error(capsys, ["grpo", "--model", "no-such-model", "--out", str(tmp_path), *DATA, *flags])
    assert message in err


def test_empty_dataset_file_and_broken_reward(sft_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "dataset is empty" in _error(capsys, ["grpo", "--model", str(sft_model), "--out", str(tmp_path / "a"),
                                                 "--dataset", str(empty)])
    assert "--model must be given" in _error(capsys, ["sft", "--out", str(tmp_path), *DATA])
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_GRPO.items()]
    with pytest.warns(RewardWarning, match="verifier offline"):
        err = _error(capsys, ["grpo", "--model", str(sft_model), "--out", str(tmp_path / "b"), *DATA, "--steps", "1",
                              *flags, "--reward", "tests.rl.test_commands:always_raises"])
    assert "'always_raises' failed on all 6 samples" in err and "LookupError" in err


def test_sigkilled_sft_resumes_onto_the_uninterrupted_loss_curve(tmp_path, capsys):
    args = ["sft", "--model", "tiny", *DATA, "--steps", "8", "--batch-size", "4", "--warmup-steps", "2",
            "--save-every", "2", "--keep-checkpoints", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*args, "--out", str(whole)]) == 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32", *args, "--out", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The event: the first checkpoint is in place. Wherever the kill then lands (mid-step,
        # mid-save, even after the end), resuming must give the uninterrupted run.
        wait_for(lambda: any((killed / "checkpoints").glob("checkpoint-*")), proc, "the first checkpoint")
    finally:
        sigkill(proc)

    assert "already holds checkpoints" in _error(capsys, [*args, "--out", str(killed)])
    assert "other settings (train.lr: 0.001 vs 0.5; checkpoint vs now)" in _error(
        capsys, [*args, "--out", str(killed), "--resume", "--lr", "0.5"])
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    curves = [[(r["step"], r["loss"]) for r in read_metrics(run / "sft_metrics.jsonl")] for run in (whole, killed)]
    assert curves[0] == curves[1] and [step for step, _ in curves[0]] == list(range(1, 9))
    assert same_weights(dsv32.load_pretrained(killed), dsv32.load_pretrained(whole))
