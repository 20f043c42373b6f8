"""Distributed training on CPU with 2 processes (torchrun, gloo, FSDP2), for every verb that runs
under torchrun: the loss curve equals a single-process run with the same global batch (to 1e-5;
float sums in another order), with gradient accumulation 2, and a checkpoint written at world
size 2 resumes at world size 1 and continues the same curve. The DSA stages run with top-k below
the sequence length (selection active), an MTP layer (its indexer trains too) and activation
checkpointing. Verbs that do not shard refuse torchrun in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.killing import HANG_GUARD_S

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")

TOL = 1e-5


def run(args, nproc=1, cwd=None, env=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(launcher + ["-m", "dsv32", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=HANG_GUARD_S)   # a hang guard, not a speed test
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(folder):
    return {r["step"]: r["loss"] for r in map(json.loads, open(folder / "metrics.jsonl")) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (folder / "code.py").write_text(text)
    return folder


def pretrain_args(corpus, out, *extra):
    return ["pretrain", "--model", "tiny", "--corpus", str(corpus), "--seq-len", "64", "--task-fraction", "0",
            "--steps", "4", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "2",
            "--log-every", "1", "--no-progress", "--out", str(out), *extra]


def test_two_processes_match_one_and_resume_at_world_size_one(corpus, tmp_path):
    run(pretrain_args(corpus, tmp_path / "ws2", "--stop-at", "2"), nproc=2)
    ckpt = tmp_path / "ws2" / "checkpoints" / "checkpoint-00000002"
    assert (ckpt / "dcp").is_dir() and (ckpt / "model.safetensors").is_file()   # sharded + HF export
    run(pretrain_args(corpus, tmp_path / "ws2", "--resume"))                    # world size 1
    run(pretrain_args(corpus, tmp_path / "ws1"))
    sharded, single = losses(tmp_path / "ws2"), losses(tmp_path / "ws1")
    assert sorted(sharded) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(sharded[step] - single[step]) < TOL, (step, sharded[step], single[step])
    assert single[4] < single[1]


REWARD = """
def varied(prompt, completion, example):
    # Varies with what was sampled, so a random tiny policy gets non-zero advantages.
    return (sum(map(ord, completion)) % 7) / 7 + len(completion) / 3
"""


def test_grpo_two_processes_match_one_and_resume_on_one_process(tmp_path):
    (tmp_path / "grpo_reward.py").write_text(REWARD)
    args = ["grpo", "--model", "tiny", "--task", "arithmetic", "--task-options", '{"digits": 1, "ops": "+"}',
            "--reward", "grpo_reward:varied", "--prompts-per-step", "4", "--group-size", "2",
            "--max-new-tokens", "3", "--minibatches", "2", "--checkpoint-every", "1", "--beta", "0.01",
            "--top-p", "0.9", "--lr", "3e-3"]
    env_path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run(args + ["--steps", "2", "--out", str(tmp_path / "g")], nproc=2, cwd=tmp_path, env=env_path)
    run(args + ["--steps", "3", "--out", str(tmp_path / "g")], cwd=tmp_path, env=env_path)
    run(args + ["--steps", "3", "--out", str(tmp_path / "one")], cwd=tmp_path, env=env_path)
    sharded = [json.loads(line) for line in open(tmp_path / "g" / "metrics.jsonl")]
    single = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert [r["step"] for r in sharded] == [r["step"] for r in single] == [1, 2, 3]
    assert any(abs(r["loss"]) > 1e-4 for r in single)              # advantages are not all zero
    for a, b in zip(sharded, single):
        for key in ("reward_mean", "loss", "kl", "ratio_mean", "grad_norm"):
            assert abs(a[key] - b[key]) < TOL, (a["step"], key, a[key], b[key])
    assert (tmp_path / "g" / "checkpoints" / "checkpoint-00000003" / "policy" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    """The tiny preset with one MTP layer, randomised so that every indexer selects something."""
    import dataclasses

    import torch

    import dsv32
    from tests.conftest import randomize_
    cfg = dataclasses.replace(dsv32.ModelConfig.preset("tiny"), num_nextn_predict_layers=1)
    folder = tmp_path_factory.mktemp("init") / "model"
    with torch.no_grad():
        randomize_(dsv32.DSV32ForCausalLM(cfg), seed=3, std=0.1).save_pretrained(folder)
    return folder


def sparsify_args(stage, init, corpus, out, *extra):
    return ["sparsify", "--stage", stage, "--init", str(init), "--topk", "24", "--corpus", str(corpus),
            "--seq-len", "96", "--task-fraction", "0", "--steps", "4", "--batch-size", "4", "--grad-accum", "2",
            "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "2", "--log-every", "1", "--no-progress",
            "--activation-checkpointing", "--mtp-weight", "0.3", "--out", str(out), *extra]


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_dsa_stages_two_processes_match_one_and_resume_at_world_size_one(stage, mtp_model, corpus, tmp_path):
    run(sparsify_args(stage, mtp_model, corpus, tmp_path / "ws2", "--stop-at", "2"), nproc=2)
    assert (tmp_path / "ws2" / "checkpoints" / "checkpoint-00000002" / "dcp").is_dir()
    run(sparsify_args(stage, mtp_model, corpus, tmp_path / "ws2", "--resume"))
    run(sparsify_args(stage, mtp_model, corpus, tmp_path / "ws1"))
    sharded, single = losses(tmp_path / "ws2"), losses(tmp_path / "ws1")
    assert sorted(sharded) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(sharded[step] - single[step]) < TOL, (stage, step, sharded[step], single[step])
    records = [json.loads(line) for line in open(tmp_path / "ws1" / "metrics.jsonl")]
    kl = "indexer_kl" if stage == "warmup" else "indexer_kl_selected"
    assert all(r[kl] > 0 for r in records if r["kind"] == "train")
    if stage == "warmup":
        assert single[4] < single[1]                 # only the indexers train, and they learn
        assert "indexer_kl/layer2" in records[0]     # the MTP layer's indexer is trained too


def test_eval_refuses_torchrun_in_one_line(mtp_model, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + ["-m", "dsv32", "eval", "--model", str(mtp_model)], capture_output=True,
                          text=True, env=env, timeout=HANG_GUARD_S)   # a hang guard, not a speed test
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "dsv32: error:" in line]
    assert len(ours) == 2 and all("eval runs on one process" in line for line in ours), proc.stderr[-2000:]
    assert "src/dsv32/" not in proc.stderr      # no traceback from our code (torchrun adds its own report)


def test_sft_two_processes_match_one_and_resume_at_world_size_one(tmp_path):
    # A constant schedule after the warm-up, so a 2-step run extended to 4 follows a 4-step run.
    args = ["sft", "--model", "tiny", "--task", "arithmetic", "--task-options", '{"digits": 1, "ops": "+"}',
            "--train-size", "64", "--eval-size", "8", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1",
            "--schedule", "constant"]
    run(args + ["--steps", "2", "--out", str(tmp_path / "ws2")], nproc=2)
    run(args + ["--steps", "4", "--resume", "--out", str(tmp_path / "ws2")])
    run(args + ["--steps", "4", "--out", str(tmp_path / "ws1")])
    read = lambda f: {r["step"]: r["loss"] for r in map(json.loads, open(f / "sft_metrics.jsonl"))
                      if r.get("kind", "train") == "train"}
    sharded, single = read(tmp_path / "ws2"), read(tmp_path / "ws1")
    assert sorted(sharded) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(sharded[step] - single[step]) < TOL, (step, sharded[step], single[step])
    assert single[4] < single[1]
