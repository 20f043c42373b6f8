"""Training checkpoints for every verb (pretrain, sparsify, sft, grpo): one folder per saved
step, holding any number of named models, the optimizer, the loop's state, the RNG states and
the run's settings; written atomically, pruned, checked against the current settings on resume.

    run/checkpoints/checkpoint-00000100/
        config.json, model.safetensors     the model named "model" (the trainer's), in the Hugging
                                           Face layout at the top, so `dsv32.load_pretrained(folder)`
                                           loads the checkpoint as it is
        tokenizer.json, ...                the files given as `files` (the run's tokenizer), so that
                                           a checkpoint is read with the tokenizer it was trained on
        checksums.sha256                   sha256 of every file above and of trainer_state.pt
                                           (each model folder has its own; `sha256sum -c` reads it)
        policy/, reference/                any other named model (GRPO's), each in its own folder
        trainer_state.pt                   loop state (step, data position, ...), format, RNG
                                           states (torch, CUDA, Python `random`, NumPy), the run's
                                           settings, and the optimizer state by parameter name
        dcp/                               sharded runs only (torchrun): models + optimizer as
                                           torch.distributed.checkpoint shards, what resume reads

Atomic: a checkpoint is written into the hidden folder `.checkpoint-NNNNNNNN.tmp`, every file and
folder in it is fsynced, and it is renamed into place in one step (then the parent is
fsynced); only then are older checkpoints pruned (`keep` newest kept). A run killed at any
moment keeps its previous checkpoint. `clean_leftovers()` (run at start and before every
save) removes the crash leftovers of every writer this project has had: `.checkpoint-*`
(this module's temporary folders, the old GRPO writer's `.checkpoint-N.tmp-PID` and
`.checkpoint-N.old-PID`) and `..checkpoint-*` (the HF writer's own temporary folder beside a
temporary checkpoint folder), in the checkpoint root and in the run folder above it (where GRPO
used to write), and the HF writer's temporary folder of a model saved at the run folder itself
(`.RUN.tmp-*` beside it: sft's final model). Reading uses `torch.load(weights_only=True)`,
safetensors, and for DCP metadata (a pickle) an unpickler that admits only DCP's own classes
(`checkpoint.dcp_reader`): nothing in a checkpoint can run code.

Optimizer state: by parameter name (torch.distributed.checkpoint.state_dict's full form), so a
checkpoint resumes at any world size; under torchrun every rank calls `save`/`load`, the full
state is gathered to rank 0, which writes. With `sharded=True` (the trainer under torchrun) each
rank writes its own DCP shards instead, plus the gathered models in the HF layout; DCP
re-shards on load, so those resume at any world size too. `load` reads whichever the checkpoint
holds.

Resume check (`load`): before anything is loaded, the checkpoint's model configs and run
settings are compared with the current ones, and a difference is ONE ValueError naming every
field that differs (checkpoint vs now) — a model of another shape reports its config fields,
not a page of size mismatches. Settings named in `MAY_CHANGE_ON_RESUME` may differ:

    steps              more steps extend a finished run (the trainer's cosine schedule is then
                       computed over the new total); fewer end it where it is
    log_every, save_every, checkpoint_every, keep_checkpoints, eval_every, eval_sequences,
    progress           logging, evaluation, checkpoint cadence and the progress display
    reward_timeout     GRPO's reward time limit (a run stalled by a hanging reward resumes with one)

Fault injection: with the environment variable `DSV32_PAUSE_IN_SAVE=STEP:FILE`, the save of
checkpoint STEP stops where `during_write` is called (models written, trainer state not yet),
writes the temporary folder's path to FILE and waits there until the process is killed; this is
how `scripts/crash_test.py` and the tests kill a run in the middle of a save, whatever the
machine's speed.

Left out: asynchronous saves and cloud storage.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)

from ..checkpoint.integrity import write_manifest
from ..checkpoint.hf import writer_temporaries
from ..config import ModelConfig
from ..distributed import DistInfo, barrier, single_process_dcp

STATE_NAME = "trainer_state.pt"
STATE_FORMAT = 2
DCP_DIR = "dcp"
MAIN_MODEL = "model"           # the model written at the top of a checkpoint folder
MAY_CHANGE_ON_RESUME = frozenset({"steps", "log_every", "save_every", "checkpoint_every", "keep_checkpoints",
                                  "eval_every", "eval_sequences", "progress", "reward_timeout"})
LEFTOVER_PREFIXES = (".checkpoint-", "..checkpoint-")
_NAME = re.compile(r"^checkpoint-(\d+)$")
_RESERVED = frozenset({"format", "settings", "rng", "optimizer"})


# ------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """torch (CPU), CUDA (every device, when present), Python `random` and NumPy states, as plain
    tensors and containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


# ------------------------------------------------------------------------------- settings
def config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """'field: saved vs current' for every config.json field that differs (dtype aside: a
    checkpoint records the dtype its weights were written in)."""
    a, b = saved.to_hf_config(), current.to_hf_config()
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k != "dtype" and a.get(k) != b.get(k)]


def settings_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """'dotted.name: saved vs current' for every leaf of two nested dicts that differs, except
    the names in MAY_CHANGE_ON_RESUME."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            if key in MAY_CHANGE_ON_RESUME:
                continue
            out += settings_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} vs {current!r}"]


# ------------------------------------------------------------------------------- files
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full_model(model: nn.Module, path: str | Path, info: DistInfo) -> None:
    """The model in the HF layout at `path`; a sharded model is gathered to rank 0, which writes.
    Every rank calls this under torchrun."""
    if not info.enabled:
        model.save_pretrained(path)
        return
    full = _full(model)
    if info.is_main:
        model.save_pretrained(path, state_dict=full)     # the model's own layout, whatever its family
    barrier(info)


def _pause_if_asked(step: int, tmp: Path) -> None:
    """The DSV32_PAUSE_IN_SAVE hook (module docstring)."""
    asked = os.environ.get("DSV32_PAUSE_IN_SAVE")
    if not asked:
        return
    at, _, marker = asked.partition(":")
    if not at.isdigit() or not marker:
        raise ValueError(f"DSV32_PAUSE_IN_SAVE must be STEP:FILE, got {asked!r}")
    if int(at) == step:
        Path(marker).write_text(str(tmp))
        while True:                          # until the crash test's SIGKILL
            time.sleep(3600)


class CheckpointFolder:
    """A root folder of `checkpoint-NNNNNNNN/` checkpoints (see the module docstring).

    keep: how many of the newest checkpoints to keep (>= 1).
    dist: the process group under torchrun (every rank calls save/load); single process if None.
    sharded: write DCP shards per rank (the trainer under torchrun) instead of gathered files.
    files: copied beside the main model into every checkpoint, under their own names (a
        tokenizer.json and its tokenizer_config.json) and listed in its checksums.
    during_write: called with the temporary folder after the models are written and before the
        trainer state and the rename; the kill-during-save test uses it to stop there."""

    def __init__(self, root: str | Path, *, keep: int = 1, dist: DistInfo | None = None, sharded: bool = False,
                 during_write: Callable[[Path], None] | None = None, files: Sequence[str | Path] = ()) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep (checkpoints to keep) must be an integer >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self.dist = dist or DistInfo()
        self.sharded = sharded
        self.during_write = during_write
        self.files = [Path(f) for f in files]
        names = [f.name for f in self.files]
        if len(set(names)) != len(names) or set(names) & {STATE_NAME, "config.json", DCP_DIR}:
            raise ValueError(f"files {names} must have distinct names other than the checkpoint's own")

    # ------------------------------------------------------------------ listing
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
        return self.root / f"checkpoint-{step:08d}", self.root / f".checkpoint-{step:08d}.tmp"

    def clean_leftovers(self) -> None:
        """Remove what killed saves left behind (rank 0 only; see the module docstring)."""
        if not self.dist.is_main:
            return
        for folder in (self.root, self.root.parent):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name.startswith(LEFTOVER_PREFIXES):
                        _remove(path)
        for path in writer_temporaries(self.root.parent):
            _remove(path)

    def _prune(self, final: Path) -> None:
        for old in self.checkpoints()[:-self.keep]:
            if old != final:
                shutil.rmtree(old)

    @staticmethod
    def model_dir(path: Path, name: str) -> Path:
        return path if name == MAIN_MODEL else path / name

    # ------------------------------------------------------------------ save
    def save(self, step: int, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
             state: Mapping[str, Any], *, settings: Mapping[str, Any], optimizer_model: str | None = None) -> Path:
        """Write checkpoint `step`: `models` (name -> model), `optimizer` (of
        `models[optimizer_model]`, default the first), the loop `state` (plain containers and
        tensors) and the run `settings` (JSON-like, checked by `load`); keep the newest `keep`."""
        info = self.dist
        opt_name = optimizer_model or next(iter(models))
        final, tmp = self.paths(step)
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean_leftovers()
            assert not final.exists(), f"{final} exists; a run never saves a step twice"
            tmp.mkdir()
        barrier(info)
        try:
            assert not set(state) & _RESERVED, f"loop state keys {sorted(set(state) & _RESERVED)} are reserved"
            record = {**state, "format": STATE_FORMAT, "settings": dict(settings), "rng": rng_state()}
            if self.sharded:
                self._save_sharded(tmp, models, optimizer, opt_name)
            else:
                for name, model in models.items():
                    save_full_model(model, self.model_dir(tmp, name), info)
                record["optimizer"] = get_optimizer_state_dict(
                    models[opt_name], optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if info.is_main:
                if self.during_write is not None:
                    self.during_write(tmp)
                _pause_if_asked(step, tmp)
                torch.save(record, tmp / STATE_NAME)
                for file in self.files:
                    shutil.copyfile(file, tmp / file.name)
                write_manifest(tmp, [STATE_NAME, *(f.name for f in self.files)])   # beside the model's files
                _fsync_tree(tmp)
                os.replace(tmp, final)
                _fsync(self.root)
        except BaseException:
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if info.is_main:
            self._prune(final)
        barrier(info)
        return final

    def _save_sharded(self, tmp: Path, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                      opt_name: str) -> None:
        import torch.distributed.checkpoint as dcp
        shards = {name: get_model_state_dict(m) for name, m in models.items() if name != opt_name}
        shards[opt_name], shards["optimizer"] = get_state_dict(models[opt_name], optimizer)
        with single_process_dcp(self.dist):
            dcp.save(shards, checkpoint_id=str(tmp / DCP_DIR))
        # Also every model in the HF layout (gathered on rank 0), so that a run folder loads with
        # `load_pretrained` whatever world size wrote it.
        for name, model in models.items():
            save_full_model(model, self.model_dir(tmp, name), self.dist)

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer, *,
             settings: Mapping[str, Any], optimizer_model: str | None = None) -> dict[str, Any]:
        """Check checkpoint `path` against the models' configs and the current `settings` (one
        ValueError naming every difference), then load the models, the optimizer and the RNG
        states in place; returns the loop state saved with it."""
        path = Path(path)
        opt_name = optimizer_model or next(iter(models))
        if not (path / STATE_NAME).is_file():
            raise ValueError(f"{path} is not a training checkpoint (it has no {STATE_NAME})")
        record = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        if record.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: unknown trainer state format {record.get('format')!r} "
                             f"(expected {STATE_FORMAT}); start a new run")
        problems = []
        for name, model in models.items():
            config = self.model_dir(path, name) / "config.json"
            if not config.is_file():
                raise ValueError(f"{path} holds no model {name!r} (no {config.relative_to(path)})")
            diff = config_differences(type(model.config).from_hf_config(config), model.config)
            if diff:
                label = "" if name == MAIN_MODEL else f" of {name!r}"
                problems.append(f"another model config{label} ({'; '.join(diff)}; checkpoint vs now)")
        diff = settings_differences(record["settings"], dict(settings))
        if diff:
            problems.append(f"other settings ({'; '.join(diff)}; checkpoint vs now)")
        if problems:
            raise ValueError(f"checkpoint {path} was made with {' and '.join(problems)}; resume with the same "
                             f"settings or start a new run")
        if (path / DCP_DIR).is_dir():
            self._load_sharded(path, models, optimizer, opt_name)
        else:
            full = StateDictOptions(full_state_dict=True)
            for name, model in models.items():
                saved = type(model).from_pretrained(self.model_dir(path, name))   # DSV32 or dense GQA layout
                set_model_state_dict(model, saved.state_dict(), options=full)
            # Not strict: parameters that never had a gradient (the indexer under an LM or GRPO
            # loss) have no optimizer state, and need none.
            set_optimizer_state_dict(models[opt_name], optimizer, record["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        set_rng_state(record["rng"])
        return {k: v for k, v in record.items() if k not in _RESERVED}

    def _load_sharded(self, path: Path, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                      opt_name: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner

        from ..checkpoint.dcp_reader import SafeFileSystemReader, read_dcp_metadata
        # The metadata is a pickle: read with an unpickler that admits only DCP's classes, once
        # here so that a refusal is our one error rather than DCP's per-rank exception report.
        read_dcp_metadata(str(path / DCP_DIR / ".metadata"))
        target = {name: get_model_state_dict(m) for name, m in models.items() if name != opt_name}
        target[opt_name], target["optimizer"] = get_state_dict(models[opt_name], optimizer)
        # Partial: parameters that never received a gradient have no optimizer state in the checkpoint.
        with single_process_dcp(self.dist):
            dcp.load(target, storage_reader=SafeFileSystemReader(str(path / DCP_DIR)),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(models[opt_name], optimizer, model_state_dict=target[opt_name],
                       optim_state_dict=target["optimizer"])
        for name, model in models.items():
            if name != opt_name:
                set_model_state_dict(model, target[name])
