"""The training loop shared by pretraining and both DSA stages.

    trainer = Trainer(model, LanguageModeling(), data, TrainConfig(steps=1000), out_dir="runs/x")
    history = trainer.fit()                  # or fit(resume=True) to continue from the latest checkpoint

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences from `data` (any
object with `next_batch(n)`, `state_dict()` and `load_state_dict()`, such as
`PackedSequences`, `MixedSequences` or SFT's `SFTExamples`; a batch is a tensor or a tuple of
tensors with one row per sequence), each passed to the objective; the mean loss is
back-propagated, gradients are clipped to `grad_clip` (global norm), the learning rate
follows warm-up + cosine, AdamW steps, and, when the objective trains the main model, the
router biases move toward balanced expert load (docs/math.md §6) using the loads of the whole step.

Resume is exact: a checkpoint (`checkpointing.CheckpointFolder`) holds the model, optimizer,
step, data position and the RNG states (torch CPU/CUDA, Python, NumPy), so on CPU a resumed run
reproduces the losses of an uninterrupted one bit for bit. A checkpoint refuses to resume a run
whose model config, train settings (`TrainConfig`), objective or `run_info` differ, naming each
difference, except the settings in `checkpointing.MAY_CHANGE_ON_RESUME` (more `steps` extend a
finished run; logging, evaluation and saving cadence); a fresh run refuses a folder that already
holds checkpoints, so nothing is overwritten by mistake. With `out_dir=None` nothing is
written (no metrics file, no checkpoints).

Under torchrun (`dist` with world size > 1) the model is sharded with FSDP2 by the caller,
every rank draws the same global batch and trains on its slice, expert loads and logged
numbers are summed/averaged over ranks (so every rank applies the same router-bias update),
checkpoints are DCP shards, and only rank 0 writes metrics or shows progress.

bf16 autocast is for CUDA only; on CPU training runs in float32 (bf16 matmuls are far slower
there). Left out: tensor/expert/pipeline parallelism and dropout (DeepSeek uses none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..model import DSV32ForCausalLM
from ..validation import check_int, check_number, is_number, require
from .checkpointing import MAIN_MODEL, CheckpointFolder
from ..distributed import DistInfo, all_reduce_mean, all_reduce_sum, local_batch, settle_sharded_parameters
from .metrics import MetricsLog, Progress
from .objectives import Objective
from .optim import build_optimizer, lr_factor, param_groups, set_lr, update_router_bias

Batch = torch.Tensor | tuple[torch.Tensor, ...]


class DataSource(Protocol):
    def next_batch(self, batch_size: int) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps in the whole run
    batch_size: int = 8               # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-4                  # peak learning rate
    lr_overrides: dict[str, float] = field(default_factory=dict)   # name substring -> peak lr
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1         # cosine floor, as a fraction of the peak
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0            # global-norm clip; 0 = off
    bias_update_gamma: float = 1e-3   # router bias update speed; 0 = off
    bf16: bool = False                # bf16 autocast (CUDA only)
    activation_checkpointing: bool = False
    seed: int = 0
    # Cadence: free to change when resuming (checkpointing.MAY_CHANGE_ON_RESUME), as is `steps`.
    log_every: int = 10
    save_every: int = 100             # a kill loses at most this many steps; 0 = only at the end
    keep_checkpoints: int = 1
    eval_every: int = 0               # 0 = never (needs an `evaluate` function)
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name, low in {"steps": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "log_every": 1,
                          "save_every": 0, "keep_checkpoints": 1, "eval_every": 0}.items():
            check_int(name, getattr(self, name), low)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        require(len(self.betas) == 2 and all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas), "betas",
                "two numbers in [0, 1)", self.betas)
        for name in ("weight_decay", "grad_clip", "bias_update_gamma"):
            check_number(name, getattr(self, name), 0)
        for key, value in self.lr_overrides.items():
            require(isinstance(key, str) and bool(key) and is_number(value) and value > 0, "lr_overrides",
                    "a map of name substrings to learning rates > 0", {key: value})

    def run_settings(self) -> dict[str, Any]:
        """Every field, as saved with a checkpoint; resume compares them (but those that may change)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _rows(batch: Batch, dist: DistInfo, device: torch.device) -> Batch:
    """This rank's rows of a global batch (a tensor or a tuple of tensors), on `device`."""
    if isinstance(batch, torch.Tensor):
        return local_batch(batch, dist).to(device)
    return tuple(local_batch(t, dist).to(device) for t in batch)


class Trainer:
    """Runs `objective` on batches of `data` for `config.steps` optimizer steps; writes
    `out_dir/metrics_name` and checkpoints (under `out_dir/checkpoints` unless a `checkpointer`
    is given; neither when `out_dir` is None). `evaluate(model) -> {name: value}` is called every
    `eval_every` steps (model in eval mode, no grad). `run_info` adds settings (e.g. the corpus)
    that resume must match; `checkpoint_files` are copied into every checkpoint (the run's
    tokenizer: `CheckpointFolder`'s `files`)."""

    def __init__(self, model: DSV32ForCausalLM, objective: Objective, data: DataSource, config: TrainConfig,
                 out_dir: str | Path | None, *, checkpointer: CheckpointFolder | None = None,
                 evaluate: Callable[[DSV32ForCausalLM], dict[str, float]] | None = None,
                 run_info: dict[str, Any] | None = None, dist: DistInfo | None = None,
                 metrics_name: str = "metrics.jsonl", checkpoint_files: Sequence[str | Path] = ()) -> None:
        self.device = next(model.parameters()).device
        if config.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast needs a CUDA device; on CPU training runs in float32 (drop --bf16)")
        self.model, self.objective, self.data, self.config = model, objective, data, config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.evaluate = evaluate
        model.activation_checkpointing = config.activation_checkpointing
        settle_sharded_parameters(model)
        groups = param_groups(model, objective.trainable, lr=config.lr, weight_decay=config.weight_decay,
                              lr_overrides=config.lr_overrides.items())
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(groups, betas=config.betas, eps=config.eps)
        self.dist = dist or DistInfo()
        if self.dist.enabled and config.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the world size "
                             f"{self.dist.world_size} (each rank trains on an equal slice of the global batch)")
        if checkpointer is None and self.out_dir is not None:
            checkpointer = CheckpointFolder(self.out_dir / "checkpoints", keep=config.keep_checkpoints,
                                            dist=self.dist, sharded=self.dist.enabled, files=checkpoint_files)
        self.checkpointer = checkpointer
        self.log = None if self.out_dir is None else MetricsLog(self.out_dir / metrics_name)
        self.settings = _jsonable({"train": config.run_settings(), "objective": objective.settings(),
                                   **(run_info or {})})
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------------ resume
    def _resolve(self, resume: bool | str | Path) -> Path:
        if self.checkpointer is None:
            raise ValueError("nothing to resume: this trainer has no output folder")
        latest = self.checkpointer.latest()
        if resume is True or resume == "latest":
            if latest is None:
                raise ValueError(f"nothing to resume: no checkpoint in {self.checkpointer.root}")
            return latest
        path = Path(resume)
        if latest is not None and path.resolve() != latest.resolve():
            # Continuing another line of training here would mix two runs' checkpoints.
            raise ValueError(f"{self.out_dir} already holds checkpoints of a run ({latest.name}); to resume from "
                             f"{path}, use it from a fresh output folder")
        return path

    def _restore(self, path: Path) -> None:
        state = self.checkpointer.load(path, {MAIN_MODEL: self.model}, self.optimizer, settings=self.settings)
        self.data.load_state_dict(state["data"])
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        if self.log is not None and self.dist.is_main:
            self.log.truncate_after(self.step)

    def save(self) -> Path | None:
        if self.checkpointer is None:
            return None
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                 "data": self.data.state_dict()}
        return self.checkpointer.save(self.step, {MAIN_MODEL: self.model}, self.optimizer, state,
                                      settings=self.settings)

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record."""
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        loss_sum, tokens = 0.0, 0
        sums: dict[str, float] = {}
        loads: dict[int, torch.Tensor] = {}
        for _ in range(cfg.grad_accum):
            batch = _rows(self.data.next_batch(cfg.batch_size), self.dist, self.device)
            self.model.check_inputs(batch[0] if isinstance(batch, tuple) else batch)   # ids, length: once per batch
            with self._autocast():
                result = self.objective(self.model, batch)
            loss = result.loss
            if self.dist.enabled:
                # Each rank's loss is a mean over its own tokens; weighing it by its share of the
                # micro-batch's tokens makes FSDP's average over ranks the mean over all of them
                # (SFT's trained tokens differ from rank to rank; equal shares leave it unchanged).
                total = float(all_reduce_sum(torch.tensor(float(result.tokens)), self.dist))
                loss = loss * (result.tokens * self.dist.world_size / max(total, 1.0))
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            tokens += result.tokens
            for key, value in result.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            for layer, load in result.expert_load.items():
                loads[layer] = loads[layer] + load if layer in loads else load.clone()
        loss = all_reduce_mean(loss_sum / cfg.grad_accum, self.dist)
        if self.dist.enabled:
            tokens = int(all_reduce_sum(torch.tensor(tokens), self.dist))
            sums = {k: all_reduce_mean(v, self.dist) for k, v in sorted(sums.items())}
            loads = {layer: all_reduce_sum(load, self.dist) for layer, load in sorted(loads.items())}
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step + 1}; lower the learning rate or "
                                     f"check the data")
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = set_lr(self.optimizer, lr_factor(self.step, warmup=cfg.warmup_steps, total=cfg.steps,
                                              min_ratio=cfg.min_lr_ratio))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = {}
        if self.objective.updates_router_bias and loads:
            balance = update_router_bias(self.model, loads, cfg.bias_update_gamma)
        self.step += 1
        self.tokens_seen += tokens
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        record = {"kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_seen": self.tokens_seen, "tokens_per_s": tokens / seconds, "step_s": seconds,
                  **{k: v / cfg.grad_accum for k, v in sums.items()}, **balance}
        return record

    def fit(self, resume: bool | str | Path = False, stop_at: int | None = None,
            stop: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Train until `config.steps`, or only until step `stop_at` (a job with a time limit; the
        run continues later with `resume=True`), or until `stop(record)` returns True after a
        step. Either way the last step is checkpointed. Returns the train records of the steps
        run by this call."""
        cfg = self.config
        if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
            raise ValueError(f"--stop-at must be a step >= 1, got {stop_at!r}")
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.checkpointer is not None:
            self.checkpointer.clean_leftovers()
        if resume:
            self._restore(self._resolve(resume))
        else:
            if self.checkpointer is not None and self.checkpointer.latest() is not None:
                raise ValueError(f"{self.out_dir} already holds checkpoints ({self.checkpointer.latest().name}); "
                                 f"pass --resume to continue that run, or choose another output folder")
            if self.log is not None and self.dist.is_main:
                self.log.truncate_after(0)   # records of a run killed before its first checkpoint
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        history: list[dict[str, Any]] = []
        progress = Progress(cfg.steps, self.step, self.objective.name, enabled=cfg.progress and self.dist.is_main)
        saved_at = self.step
        try:
            while self.step < end:
                record = self.train_step()
                history.append(record)
                progress.update(loss=record["loss"], tok_s=record["tokens_per_s"])
                stopping = stop is not None and stop(record)
                if self.log is not None and self.dist.is_main and (
                        self.step % cfg.log_every == 0 or self.step == end or stopping):
                    self.log.write(record)
                if self.evaluate is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    evaluation = self.run_evaluation()       # every rank: a sharded forward needs all
                    if self.log is not None and self.dist.is_main:
                        self.log.write({"kind": "eval", "step": self.step, **evaluation})
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
                if stopping:
                    break
            if self.checkpointer is not None and (saved_at != self.step or self.checkpointer.latest() is None):
                self.save()
        finally:
            progress.close()
        return history

    def run_evaluation(self) -> dict[str, float]:
        assert self.evaluate is not None
        self.model.eval()
        with torch.no_grad():
            return self.evaluate(self.model)
