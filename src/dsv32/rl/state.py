"""Run state for the RL loops: atomic checkpoints, a JSONL metrics log and a progress bar, each
behind one small function or object, so the loops never touch files or terminals directly
and this module can later be swapped for the shared trainer's without changing them.

Checkpoint layout, one folder per saved step:

    OUT/checkpoint-000040/
        policy/, reference/    Hugging Face layout (config.json + model.safetensors)
        optimizer.pt           optimizer state dict and torch's global RNG state
        state.json             step, data position, anything else JSON the loop passes

Atomicity: a checkpoint is written into a hidden temporary folder and renamed into place
only once complete (a rename within one file system is atomic), so a `checkpoint-*` folder
is complete by construction and a crash mid-save leaves the previous one untouched. Older
checkpoints are deleted only after the new one is in place. Everything is loaded with
`torch.load(..., weights_only=True)`: no pickled code runs on resume.

Under torchrun (FSDP2-sharded models) every rank calls `save_state` / `load_state` together:
the full weights and optimizer state are gathered to rank 0, which writes the same files as a
single process would, and every rank loads them back into its shards. The optimizer state is
stored by parameter name (torch.distributed.checkpoint.state_dict's full form), so a
checkpoint resumes at any world size.

Left out on purpose: fsync of the written files (a power cut can still lose the newest
checkpoint, never corrupt the previous one), sharded (per-rank) files — the RL models here are
small enough to gather — and asynchronous saving.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import load_pretrained, write_checkpoint
from ..checkpoint.keymap import hf_state_items
from ..model import DSV32ForCausalLM
from ..training.distributed import DistInfo, barrier

_PREFIX = "checkpoint-"


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = _checkpoints(Path(directory))
    return found[-1] if found else None


def _full_weights(model: DSV32ForCausalLM) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_state(directory: str | Path, step: int, *, models: Mapping[str, DSV32ForCausalLM],
               optimizer: torch.optim.Optimizer, state: Mapping[str, Any], keep: int = 1,
               optimizer_model: str = "policy", dist: DistInfo | None = None) -> Path:
    """Write checkpoint `step` under `directory` atomically; keep the newest `keep` (>= 1).

    models: name -> model, each saved in the Hugging Face layout under its name.
    optimizer: the optimizer of `models[optimizer_model]`.
    state: JSON-serialisable loop state (step, data position, ...), returned by `load_state`.
    dist: under torchrun, every rank calls this; rank 0 writes.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written is always kept), got {keep}")
    info = dist or DistInfo()
    weights = {name: _full_weights(model) for name, model in models.items()}        # collective
    optim = get_optimizer_state_dict(models[optimizer_model], optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    directory = Path(directory)
    final = directory / f"{_PREFIX}{step:06d}"
    if info.is_main:
        _write(directory, final, models, weights, optim, state)
        for old in _checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    barrier(info)
    return final


def _write(directory: Path, final: Path, models, weights, optim, state) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, model in models.items():
            write_checkpoint(hf_state_items(weights[name], model.config), model.config, tmp / name)
        torch.save({"optimizer": optim, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state), indent=1, sort_keys=True) + "\n")
        aside = None
        if final.exists():          # the same step saved again: move the old copy aside until replaced
            aside = directory / f".{final.name}.old-{os.getpid()}"
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside)


def load_state(directory: str | Path, *, models: Mapping[str, DSV32ForCausalLM],
               optimizer: torch.optim.Optimizer, optimizer_model: str = "policy") -> dict[str, Any] | None:
    """Restore the newest checkpoint under `directory` into `models` and `optimizer` (and
    torch's global RNG) in place. Returns its loop state, or None when there is none. Under
    torchrun every rank calls this and loads into its shards."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    full = StateDictOptions(full_state_dict=True)
    for name, model in models.items():
        set_model_state_dict(model, load_pretrained(path / name).state_dict(), options=full)
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    # Not strict: parameters that never had a gradient (the indexer under the GRPO loss) have no state.
    set_optimizer_state_dict(models[optimizer_model], optimizer, saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(saved["torch_rng"])
    return json.loads((path / "state.json").read_text())


class MetricsLog:
    """Appends one JSON object per step to a JSONL file.

    resume_step: None starts a fresh log (an existing file is replaced); an int keeps the
    records with step <= resume_step and drops later ones — written after the checkpoint being
    resumed from, they will be produced again.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] \
            if resume_step is not None and self.path.exists() else []
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL metrics file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress(total: int, initial: int = 0, desc: str = "") -> tqdm:
    """A progress bar on stderr, shown only on a terminal (quiet in tests and logs)."""
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True,
                leave=False)
