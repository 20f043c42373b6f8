"""The checkpoint folder every verb uses: named models, optimizer, loop state and RNG round-trip
exactly; saves are atomic (a failed save leaves the previous checkpoint, pruning waits for the
new one); the leftovers of every writer this project has had are cleaned at start; resume
refuses other settings or another model shape in one message naming each difference, but
lets `steps` and the cadence change; the metrics log drops records past the resumed step."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dsv32 import DSV32ForCausalLM, ModelConfig
from dsv32.training.checkpointing import STATE_NAME, CheckpointFolder
from dsv32.training.metrics import MetricsLog, read_metrics
from tests.rl.helpers import same_weights, tiny_policy
from tests.training.helpers import make_trainer

SETTINGS = {"train": {"lr": 1e-3, "steps": 5}}


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return opt


def test_round_trip_restores_models_optimizer_rng_and_state(tmp_path):
    policy, reference = tiny_policy(seed=1), tiny_policy(seed=2)
    opt = _trained_optimizer(policy)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    folder = CheckpointFolder(tmp_path)
    path = folder.save(7, {"policy": policy, "reference": reference}, opt, {"step": 7, "data_position": 56},
                       settings=SETTINGS)
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    assert path.name == "checkpoint-00000007" and (path / "policy" / "config.json").is_file()
    assert folder.latest() == path

    p2, r2 = tiny_policy(seed=3), tiny_policy(seed=4)
    opt2 = torch.optim.AdamW(p2.parameters(), lr=1e-3)
    state = folder.load(path, {"policy": p2, "reference": r2}, opt2, settings=SETTINGS)
    assert state == {"step": 7, "data_position": 56}
    assert same_weights(p2, policy) and same_weights(r2, reference)
    a, b = opt.state_dict(), opt2.state_dict()
    # Stored by parameter name (any world size); betas come back as a list, which AdamW treats alike.
    assert a["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in b["param_groups"]]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    assert CheckpointFolder(tmp_path / "empty").latest() is None


def test_failed_save_keeps_the_previous_checkpoint_and_pruning_waits(tmp_path, monkeypatch):
    policy = tiny_policy()
    opt = _trained_optimizer(policy)
    CheckpointFolder(tmp_path).save(1, {"policy": policy}, opt, {"step": 1}, settings={})
    CheckpointFolder(tmp_path, keep=2).save(2, {"policy": policy}, opt, {"step": 2}, settings={})
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-00000001", "checkpoint-00000002"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        CheckpointFolder(tmp_path).save(3, {"policy": policy}, opt, {"step": 3}, settings={})
    monkeypatch.undo()
    # Nothing half-written is left, nothing older was pruned, the latest is still step 2.
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert CheckpointFolder(tmp_path).latest().name == "checkpoint-00000002"
    CheckpointFolder(tmp_path).save(3, {"policy": policy}, opt, {"step": 3}, settings={})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000003"]
    assert torch.load(tmp_path / "checkpoint-00000003" / STATE_NAME, weights_only=True)["step"] == 3


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointFolder(tmp_path, keep=0)


def test_metrics_log_fresh_and_resumed(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    log.truncate_after(0)
    for step in (1, 2, 3):
        log.write({"step": step, "reward_mean": step / 10})
    resumed = MetricsLog(path)
    resumed.truncate_after(2)
    resumed.write({"step": 3, "reward_mean": 0.0})
    assert read_metrics(path) == [{"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.2},
                                  {"step": 3, "reward_mean": 0.0}]
    MetricsLog(path).truncate_after(0)
    assert read_metrics(path) == []


@pytest.mark.parametrize("torn", ['{"step": 3, "loss": 1.2', '{"step": 3, "lo\0\0\0', "[1, 2", "\0\0\0\0"])
def test_a_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + torn)
    with pytest.warns(UserWarning, match=rf"metrics.jsonl, line 3: dropped a torn last record"):
        assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    with pytest.warns(UserWarning, match="line 3"):
        MetricsLog(path).truncate_after(2)         # what a resume does: the file is whole again
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_broken_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record"):
        read_metrics(path)


def test_a_run_killed_mid_log_write_resumes_onto_the_same_curve(tmp_path):
    whole = make_trainer(tmp_path / "whole").fit()
    run = tmp_path / "run"
    make_trainer(run).fit(stop_at=3)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 4, "loss": 3.')       # the write the kill cut short
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line 4: dropped a torn last record"):
        resumed = make_trainer(run)
        resumed.fit(resume=True)
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")] == [r["loss"] for r in whole]


LEFTOVERS = {
    "checkpoints/.checkpoint-00000004.tmp": "dir",           # this module's temporary folder
    "checkpoints/..checkpoint-00000004.tmp.tmp-k2j1x9": "dir",  # the HF writer's, beside it (pretrain/sparsify)
    ".checkpoint-000040.tmp-4242": "dir",                    # the old GRPO writer, another PID
    f".checkpoint-000040.tmp-{os.getpid()}": "dir",         # ... and this PID
    ".checkpoint-000040.old-4242": "dir",                    # the old GRPO writer's set-aside copy
    "checkpoints/.checkpoint-000012.tmp-77": "dir",
    "metrics.jsonl.tmp": "file",                             # the trainer's log truncation
    "../.run.tmp-x8f2k1": "dir",                             # the HF writer's, for a model saved at the run folder (sft)
    ".metrics.jsonl.tmp-4242": "file",                       # the old RL log's
}


def _plant_leftovers(run):
    for name, kind in LEFTOVERS.items():
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"partial")
        else:
            path.write_text('{"step": 99}\n')


def test_leftovers_of_every_writer_are_cleaned_at_start(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, steps=2).fit()
    _plant_leftovers(run)
    # A resume with nothing left to do writes no checkpoint: what is cleaned is cleaned at start.
    assert make_trainer(run, steps=2).fit(resume=True) == []
    assert not [n for n in LEFTOVERS if (run / n).exists()]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-00000002"]


def test_grpo_cleans_the_same_leftovers_at_start(tmp_path):
    from dsv32.rl import GRPOConfig, train_grpo
    from tests.rl.helpers import TOKENIZER, arithmetic
    run = tmp_path / "run"
    _plant_leftovers(run)
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2)
    train_grpo(tiny_policy(), TOKENIZER, arithmetic(4), config, out_dir=run, show_progress=False)
    assert not [n for n in LEFTOVERS if (run / n).exists()]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-00000001"]


def test_resume_with_other_settings_names_each_one(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    with pytest.raises(ValueError) as e:
        make_trainer(tmp_path, steps=2, lr=1e-3, batch_size=3, log_every=5, save_every=1).fit(resume=True)
    message = str(e.value)
    assert "other settings (train.batch_size: 2 vs 3; train.lr: 0.003 vs 0.001; checkpoint vs now)" in message
    assert "log_every" not in message and "save_every" not in message and "\n" not in message


def test_another_model_shape_is_one_line_naming_the_fields(tmp_path):
    policy = tiny_policy()
    opt = _trained_optimizer(policy)
    path = CheckpointFolder(tmp_path).save(1, {"policy": policy}, opt, {}, settings=SETTINGS)
    cfg = policy.config.replace(hidden_size=policy.config.hidden_size * 2)
    other = DSV32ForCausalLM(ModelConfig.from_hf_config(cfg.to_hf_config()))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as e:
        CheckpointFolder(tmp_path).load(path, {"policy": other}, torch.optim.AdamW(other.parameters()),
                                        settings={"train": {"lr": 0.5, "steps": 5}})
    message = str(e.value)
    assert "\n" not in message and "size mismatch" not in message
    assert f"another model config of 'policy' (hidden_size: {policy.config.hidden_size} vs {cfg.hidden_size}" in message
    assert "other settings (train.lr: 0.001 vs 0.5" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())     # nothing was loaded


def test_more_steps_extend_a_finished_run(tmp_path):
    straight = make_trainer(tmp_path / "straight", steps=6).fit()
    assert [r["step"] for r in make_trainer(tmp_path / "run", steps=4).fit()] == [1, 2, 3, 4]
    extended = make_trainer(tmp_path / "run", steps=6)
    tail = extended.fit(resume=True)
    assert [r["step"] for r in tail] == [5, 6]
    assert [r["step"] for r in extended.log.read()] == [1, 2, 3, 4, 5, 6]
    assert CheckpointFolder(tmp_path / "run" / "checkpoints").latest().name == "checkpoint-00000006"
    # The schedule of the extended run is the 6-step one from step 5 on; steps 1-2 (warm-up) agree.
    assert [r["loss"] for r in extended.log.read()][:2] == [r["loss"] for r in straight][:2]
    assert make_trainer(tmp_path / "run", steps=5).fit(resume=True) == []           # fewer: nothing to do
