"""Run state: checkpoints round-trip exactly, are written atomically (a failed save leaves the
previous one untouched), old ones are pruned only after the new one is complete; the metrics
log drops records past the step being resumed from."""

from __future__ import annotations

import json

import pytest
import torch

from dsv32.rl import MetricsLog, load_state, read_metrics, save_state
from dsv32.rl.state import latest_checkpoint
from tests.rl.helpers import same_weights, tiny_policy


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return opt


def test_round_trip_restores_models_optimizer_rng_and_state(tmp_path):
    policy, reference = tiny_policy(seed=1), tiny_policy(seed=2)
    opt = _trained_optimizer(policy)
    torch.manual_seed(123)
    path = save_state(tmp_path, 7, models={"policy": policy, "reference": reference}, optimizer=opt,
                      state={"step": 7, "data_position": 56})
    expected_draw = torch.rand(3)
    assert path.name == "checkpoint-000007" and (path / "policy" / "config.json").is_file()

    p2, r2 = tiny_policy(seed=3), tiny_policy(seed=4)
    opt2 = torch.optim.AdamW(p2.parameters(), lr=1e-3)
    state = load_state(tmp_path, models={"policy": p2, "reference": r2}, optimizer=opt2)
    assert state == {"step": 7, "data_position": 56}
    assert same_weights(p2, policy) and same_weights(r2, reference)
    a, b = opt.state_dict(), opt2.state_dict()
    # Stored by parameter name (any world size); betas come back as a list, which AdamW treats alike.
    assert a["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in b["param_groups"]]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    assert torch.equal(torch.rand(3), expected_draw)
    assert load_state(tmp_path / "empty", models={}, optimizer=opt2) is None


def test_failed_save_keeps_the_previous_checkpoint_and_pruning_waits(tmp_path, monkeypatch):
    policy = tiny_policy()
    opt = _trained_optimizer(policy)
    save_state(tmp_path, 1, models={"policy": policy}, optimizer=opt, state={"step": 1})
    save_state(tmp_path, 2, models={"policy": policy}, optimizer=opt, state={"step": 2}, keep=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-000001", "checkpoint-000002"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path, 3, models={"policy": policy}, optimizer=opt, state={"step": 3}, keep=1)
    monkeypatch.undo()
    # Nothing half-written is left, nothing older was pruned, the latest is still step 2.
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-000001", "checkpoint-000002"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002"
    save_state(tmp_path, 3, models={"policy": policy}, optimizer=opt, state={"step": 3}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000003"]
    assert json.loads((tmp_path / "checkpoint-000003" / "state.json").read_text()) == {"step": 3}


def test_metrics_log_fresh_and_resumed(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "reward_mean": step / 10})
    MetricsLog(path, resume_step=2).write({"step": 3, "reward_mean": 0.0})
    assert read_metrics(path) == [{"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.2},
                                  {"step": 3, "reward_mean": 0.0}]
    MetricsLog(path)
    assert read_metrics(path) == []


def test_keep_must_be_positive(tmp_path):
    policy = tiny_policy()
    with pytest.raises(ValueError, match="keep"):
        save_state(tmp_path, 1, models={"policy": policy}, optimizer=_trained_optimizer(policy), state={}, keep=0)
