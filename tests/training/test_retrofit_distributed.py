"""The DSA retrofit of a dense Hugging Face checkpoint (a tiny Llama-3.2-style model with tied
embeddings, written by transformers) under torchrun with 2 gloo processes and FSDP2, through the
same sharded path as the MLA model: each stage is SIGKILLed inside the save of its last
checkpoint, resumed (at world size 2 for the warm-up, 1 for the sparse stage), and its loss curve
equals a single-process run's (to 1e-5). The checkpoint the two processes wrote (gathered HF layout
beside the DCP shards) equals the single-process one, loads in transformers as the dense model
(the indexer tensors its only extra keys) and in dsv32 with the indexer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv32 import AttentionOptions
from dsv32.checkpoint.hf_dense import load_dense
from tests.killing import wait_for
from tests.training.helpers import hf_dense_checkpoint
from tests.training.test_distributed import TOL, losses, run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return hf_dense_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "Llama", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "words.txt").write_text(" ".join(f"w{i % 37} x{i % 11}" for i in range(3000)))
    return folder


def sparsify_args(stage: str, init: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    # top-k 16 below the 96-token sequences: the sparse stage selects.
    return ["sparsify", "--stage", stage, "--init", str(init), "--topk", "16", "--corpus", str(corpus),
            "--seq-len", "96", "--task-fraction", "0", "--steps", "4", "--batch-size", "4", "--grad-accum", "2",
            "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "2", "--log-every", "1", "--no-progress",
            "--activation-checkpointing", "--keep", "2", "--out", str(out), *extra]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:                                  # ended meanwhile
            continue
        if int(fields[1]) == pid:                        # field 4 of /proc/PID/stat: the parent
            found.append(int(stat.parent.name))
    return found


def kill_inside_last_save(args: list[str], marker: Path) -> None:
    """Launch `args` on 2 processes, paused inside the save of checkpoint 4 (models written, trainer
    state not yet), and SIGKILL the workers there, then the launcher. torchrun starts each worker
    in a session of its own, so they are found as the launcher's descendants, by process id."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "dsv32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV32_PAUSE_IN_SAVE": f"4:{marker}"}
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, proc, "the pause inside the save of checkpoint 4")
    finally:
        family, todo = [], [proc.pid]
        while todo:
            family += (kids := [c for p in todo for c in _children(p)])
            todo = kids
        for pid in reversed(family):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:                   # ended meanwhile
                pass
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stage, resume_nproc", [("warmup", 2), ("sparse", 1)])
def test_retrofit_stages_two_processes_killed_resume_and_match_one(stage, resume_nproc, llama, corpus, tmp_path):
    sharded, single = tmp_path / "ws2", tmp_path / "ws1"
    kill_inside_last_save(sparsify_args(stage, llama, corpus, sharded), tmp_path / "paused")
    checkpoints = sharded / "checkpoints"
    assert (checkpoints / "checkpoint-00000002" / "dcp").is_dir()
    assert not (checkpoints / "checkpoint-00000004").exists() and (checkpoints / ".checkpoint-00000004.tmp").is_dir()
    run(sparsify_args(stage, llama, corpus, sharded, "--resume"), nproc=resume_nproc)
    run(sparsify_args(stage, llama, corpus, single))
    got, want = losses(sharded), losses(single)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step] - want[step]) < TOL, (stage, step, got[step], want[step])
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())      # the killed save's leftovers

    written = checkpoints / "checkpoint-00000002"                              # gathered from 2 processes
    ours = load_dense(written).eval()
    assert ours.config.indexer is not None and ours.config.indexer.topk == 16
    reference = load_dense(single / "checkpoints" / "checkpoint-00000002").state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0, msg=name)
    if stage == "warmup":                                                      # only the indexers trained
        for name, tensor in load_dense(llama).state_dict().items():
            assert torch.equal(tensor, ours.state_dict()[name]), name

    saved = json.loads((written / "config.json").read_text())
    original = json.loads((llama / "config.json").read_text())
    assert saved.pop("dsa_retrofit")["topk"] == 16
    saved.pop("dtype"), original.pop("dtype")
    assert saved == original
    hf, info = transformers.LlamaForCausalLM.from_pretrained(written, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(".self_attn.indexer." in k for k in info["unexpected_keys"])
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = ours(ids, attention=AttentionOptions(sparse=False)).logits
        torch.testing.assert_close(dense, hf.eval()(ids).logits, atol=1e-4, rtol=0)
        sparse = ours(ids, attention=AttentionOptions(sparse=True)).logits
    # The loaded indexer selects: the first 16 queries see at most k keys (exactly dense), later ones fewer.
    torch.testing.assert_close(sparse[:, :16], dense[:, :16], atol=1e-5, rtol=0)
    assert (sparse[:, 16:] - dense[:, 16:]).abs().max() > 1e-3
