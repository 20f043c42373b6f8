"""Training checkpoints: save, find the latest, load — behind a small interface so that another
backend (FSDP2 with torch.distributed.checkpoint, sharded across ranks) can replace the local one.

`LocalCheckpointer` writes one folder per checkpoint under its root:

    checkpoint-00000100/
        config.json, model.safetensors     the model in the Hugging Face layout (save_pretrained),
                                           so `dsv32.load_pretrained(folder)` loads it as it is
        trainer_state.pt                   optimizer state, step, data position, RNG states and
                                           the run's settings (plain tensors and containers)

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into
place in one step; only then are older checkpoints removed (`keep` are kept). A run killed at
any moment therefore leaves its previous checkpoint intact, plus at most a partial temporary
folder, which `latest()` ignores and the next save clears away. Reading uses
`torch.load(weights_only=True)` only: nothing in a checkpoint can run code.

Left out: sharded and asynchronous saves (the FSDP2/DCP backend), and cloud storage.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..checkpoint import load_pretrained
from ..config import ModelConfig
from ..model import DSV32ForCausalLM

STATE_NAME = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d{8})$")
_TMP_PREFIX = ".checkpoint-"


class Checkpointer(Protocol):
    """What the trainer needs from a checkpoint backend."""

    def save(self, step: int, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path: ...
    def latest(self) -> Path | None: ...
    def load(self, path: Path, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]: ...


def config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """'field: saved vs current' for every config.json field that differs (dtype aside: a
    checkpoint records the dtype its weights were written in)."""
    a, b = saved.to_hf_config(), current.to_hf_config()
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k != "dtype" and a.get(k) != b.get(k)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointFolder:
    """A root folder of `checkpoint-NNNNNNNN/` checkpoints, `keep` of the newest kept; what every
    backend shares (listing, the latest one, the names of the temporary folders)."""

    def __init__(self, root: str | Path, *, keep: int = 1) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep (checkpoints to keep) must be an integer >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def paths(self, step: int) -> tuple[Path, Path]:
        """(final folder, temporary folder) of checkpoint `step`."""
        return self.root / f"checkpoint-{step:08d}", self.root / f"{_TMP_PREFIX}{step:08d}.tmp"

    def clear_partial(self) -> None:
        """Remove the temporary folders of saves that never finished (killed runs)."""
        for stale in self.root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    def prune(self, final: Path) -> None:
        for old in self.checkpoints()[:-self.keep]:
            if old != final:
                shutil.rmtree(old)


class LocalCheckpointer(CheckpointFolder):
    """Checkpoints on the local file system; see the module docstring.

    keep: how many of the newest checkpoints to keep (>= 1).
    during_write: called with the temporary folder after the weights are written and before
        the trainer state and the rename; the kill-during-save test uses it to stop there."""

    def __init__(self, root: str | Path, *, keep: int = 1,
                 during_write: Callable[[Path], None] | None = None) -> None:
        super().__init__(root, keep=keep)
        self.during_write = during_write

    def save(self, step: int, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.clear_partial()
        final, tmp = self.paths(step)
        assert not final.exists(), f"{final} exists; the trainer never saves a step twice"
        tmp.mkdir()
        model.save_pretrained(tmp)
        if self.during_write is not None:
            self.during_write(tmp)
        torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / STATE_NAME)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(self.root)
        self.prune(final)
        return final

    def load(self, path: Path, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Check that `path` holds a checkpoint of this model's config, then load the weights
        and optimizer state into `model` and `optimizer`; returns the rest of the state."""
        path = Path(path)
        if not (path / STATE_NAME).is_file() or not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a training checkpoint (it needs config.json and {STATE_NAME})")
        saved = ModelConfig.from_hf_config(path / "config.json")
        diff = config_differences(saved, model.config)
        if diff:
            raise ValueError(f"checkpoint {path} was made with another model config ({'; '.join(diff)}; "
                             f"checkpoint vs now); resume with the same settings or start a new run")
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        weights = load_pretrained(path).state_dict()
        model.load_state_dict(weights)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state
