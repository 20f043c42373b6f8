"""Distributed training on CPU with 2 processes (torchrun, gloo, FSDP2): the loss curve equals a
single-process run with the same global batch (to 1e-5; float sums in another order), and a
checkpoint written at world size 2 resumes at world size 1. GRPO runs sharded too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")

TOL = 1e-5


def run(args, nproc=1, cwd=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(launcher + ["-m", "dsv32", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
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


def test_grpo_runs_sharded_and_resumes_on_one_process(tmp_path):
    args = ["grpo", "--model", "tiny", "--task", "arithmetic", "--task-options", '{"digits": 1, "ops": "+"}',
            "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "3", "--minibatches", "2",
            "--checkpoint-every", "1", "--beta", "0.01", "--top-p", "0.9", "--out", str(tmp_path / "g")]
    run(args + ["--steps", "2"], nproc=2)
    run(args + ["--steps", "3"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "g" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert (tmp_path / "g" / "checkpoints" / "checkpoint-00000003" / "policy" / "model.safetensors").is_file()
