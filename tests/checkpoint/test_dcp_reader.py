"""DCP metadata is a pickle; resuming a sharded checkpoint reads it with an unpickler that admits
only DCP's own classes. A crafted `.metadata` (issue 13: it ran its payload on `--resume`) is
refused with an error naming the file, and its payload never runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dsv32.checkpoint import CheckpointError
from dsv32.checkpoint.dcp_reader import read_dcp_metadata
from dsv32.training.checkpointing import DCP_DIR, CheckpointFolder
from tests.rl.helpers import same_weights, tiny_policy


class _Payload:
    """Unpickling this runs `os.system(command)`: what an attacker's `.metadata` would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _sharded_checkpoint(tmp_path):
    model = tiny_policy(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    folder = CheckpointFolder(tmp_path / "checkpoints", sharded=True)
    return model, folder, folder.save(3, {"model": model}, opt, {"step": 3}, settings={"a": 1})


def test_a_sharded_checkpoint_still_resumes(tmp_path):
    model, folder, path = _sharded_checkpoint(tmp_path)
    other = tiny_policy(seed=2)
    state = folder.load(path, {"model": other}, torch.optim.AdamW(other.parameters()), settings={"a": 1})
    assert state == {"step": 3} and same_weights(other, model)


@pytest.mark.parametrize("payload", ["reduce", "global"])
def test_crafted_metadata_is_refused_and_never_runs(tmp_path, payload):
    model, folder, path = _sharded_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    metadata = path / DCP_DIR / ".metadata"
    if payload == "reduce":
        metadata.write_bytes(pickle.dumps(_Payload(f"touch {marker}")))
    else:                        # a legitimate Metadata object whose fields smuggle the call
        real = read_dcp_metadata(str(metadata))
        real.planner_data = _Payload(f"touch {marker}")
        metadata.write_bytes(pickle.dumps(real))
    other = tiny_policy(seed=2)
    with pytest.raises(CheckpointError, match=r"\.metadata.*(os\.system|posix\.system)"):
        folder.load(path, {"model": other}, torch.optim.AdamW(other.parameters()), settings={"a": 1})
    assert not marker.exists()


def test_garbage_metadata_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match=str(path)):
        read_dcp_metadata(str(path))
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="holds a dict"):
        read_dcp_metadata(str(path))
