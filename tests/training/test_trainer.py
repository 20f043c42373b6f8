"""The trainer: exact resume, crash-safe checkpoints, bias balancing, schedule, bad settings."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv32
from dsv32.training.checkpointing import STATE_NAME, CheckpointFolder
from dsv32.training.optim import lr_factor, update_router_bias
from tests.killing import sigkill, wait_for
from tests.training.helpers import byte_model, make_trainer

ROOT = Path(__file__).resolve().parents[2]


def _losses(records):
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    whole = make_trainer(tmp_path / "whole")
    full = whole.fit()

    first = make_trainer(tmp_path / "split")
    head = first.fit(stop_at=3)
    # A fresh process would build the model from another seed; resume must overwrite everything.
    second = make_trainer(tmp_path / "split", model_seed=1)
    tail = second.fit(resume=True)

    assert [r["step"] for r in head + tail] == list(range(1, 7))
    assert _losses(head + tail) == _losses(full)                     # bitwise equal floats
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _losses(second.log.read()) == _losses(full)              # the log reads as one run


def test_checkpoint_is_an_hf_folder_and_plain_tensors(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    trainer.fit()
    path = trainer.checkpointer.latest()
    loaded = dsv32.load_pretrained(path)
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    state = torch.load(path / STATE_NAME, weights_only=True)
    assert state["step"] == 2 and "optimizer" in state and "rng" in state


_KILLED_RUN = """
import sys, time
from pathlib import Path
from dsv32.training.checkpointing import CheckpointFolder
from tests.training.helpers import make_trainer

out, marker = Path(sys.argv[1]), Path(sys.argv[2])

def pause_on_second_save(tmp):
    if tmp.name.startswith(".checkpoint-00000004"):
        marker.write_text(str(tmp))         # tell the test we are inside the write, then wait for the kill
        while True:
            time.sleep(3600)

ckpt = CheckpointFolder(out / "checkpoints", during_write=pause_on_second_save)
make_trainer(out, checkpointer=ckpt, save_every=2).fit()
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "inside-write"
    # the child runs steps 1-2 that the resumed run continues: same thread count, same float sums
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(out), str(marker)], env=env, cwd=ROOT)
    try:
        # The event: the child is inside the write of checkpoint 4 (it wrote the marker, then waits).
        wait_for(lambda: marker.exists() and marker.read_text(), proc, "the checkpoint write")
        assert Path(marker.read_text()).joinpath("model.safetensors").exists()   # half-written checkpoint
    finally:
        sigkill(proc)
    ckpt = CheckpointFolder(out / "checkpoints")
    assert [p.name for p in ckpt.checkpoints()] == ["checkpoint-00000002"]
    dsv32.load_pretrained(ckpt.latest())                             # still loadable

    resumed = make_trainer(out).fit(resume=True)
    reference = make_trainer(tmp_path / "reference").fit()
    assert _losses(resumed) == _losses(reference)[2:]
    assert [p.name for p in ckpt.checkpoints()] == ["checkpoint-00000006"]
    assert not list((out / "checkpoints").glob(".checkpoint-*"))    # the partial folder was cleared


def test_bias_update_sign_and_balancing_effect():
    model = byte_model()
    gate = model.model.layers[1].mlp.gate
    update_router_bias(model, {1: torch.tensor([10, 0, 2, 4, 4, 4, 4, 4])}, gamma=0.5)
    assert gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]

    # A router skewed toward expert 0 (every token picks it): repeated updates, no optimizer,
    # spread the load out.
    model = byte_model()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()[0] = 0.3
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    imbalance = []
    for _ in range(40):
        with torch.no_grad():
            out = model(ids, attention=dsv32.AttentionOptions(sparse=False))
        imbalance.append(update_router_bias(model, out.expert_load, gamma=2e-2)["expert_imbalance"])
    assert imbalance[0] == 4.0                        # one expert of 8 takes every token's first slot
    assert max(imbalance[-5:]) < 0.5 * imbalance[0]


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert math.isclose(lr_factor(20, warmup=4, total=20, min_ratio=0.1), 0.1)


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    plain = make_trainer(tmp_path / "a", steps=2).fit()
    recomputed = make_trainer(tmp_path / "b", steps=2, activation_checkpointing=True).fit()
    for a, b in zip(plain, recomputed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_refusals_leave_checkpoints_alone(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(tmp_path, steps=2).fit()
    with pytest.raises(ValueError, match=r"other settings \(train.lr: 0.003 vs 0.001"):
        make_trainer(tmp_path, steps=2, lr=1e-3).fit(resume=True)
    with pytest.raises(ValueError, match="another model config"):
        trainer = make_trainer(tmp_path, steps=2)
        trainer.model.config = trainer.model.config.replace(index_topk=3)
        trainer.fit(resume=True)
    with pytest.raises(ValueError, match="bf16 autocast needs a CUDA device"):
        make_trainer(tmp_path / "other", bf16=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    dsv32.load_pretrained(CheckpointFolder(tmp_path / "checkpoints").latest())


def test_train_config_names_the_bad_field():
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
        make_trainer(Path("unused"), grad_accum=0)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        make_trainer(Path("unused"), min_lr_ratio=2.0)
