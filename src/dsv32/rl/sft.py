"""Supervised warm start for RL: teacher-forced cross-entropy on prompt -> answer examples,
with the loss on the answer tokens (and the closing EOS) only. It runs as an objective of the
shared `dsv32.training.Trainer`, so it has the trainer's checkpoints, exact resume, metrics log,
learning-rate schedule (`optim.lr_factor`) and loss (`losses.lm_loss` over labels).

Shape legend: B examples, L = the longest prompt + answer + EOS.

    sequence        encode_prompt(prompt) + encode(answer) + [EOS]   (BOS first when the tokenizer has one)
    input_ids       the sequences, right-padded with the pad id       (B, L)
    labels          the ids on the answer tokens and the EOS, -100 elsewhere (prompt, padding)   (B, L)
    attention_mask  True on the sequence's tokens                      (B, L)

The prompt is encoded exactly as GRPO encodes it (`datasets.encode_prompt`), so a model
trained here is sampled from the same token sequences later. EOS is a target so that the model
learns to stop after the answer — the exact-match rewards give 0 to anything that follows it.

Left out on purpose: packing several examples into one sequence, and the router bias update
(a short warm start leaves the pretrained balance as it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..model import DSV32ForCausalLM
from ..tokenizer import Tokenizer
from ..training.losses import IGNORE_INDEX, lm_loss
from ..training.objectives import StepResult, unpack_batch
from ..tasks import Example
from ..distributed import DistInfo
from ..training.trainer import Trainer, TrainConfig
from ..validation import check_choice, check_int, check_number
from .datasets import PromptSampler, encode_prompt

SCHEDULES = ("cosine", "constant")
ADAMW_BETAS = (0.9, 0.999)           # torch's AdamW defaults, which the warm start has always used


@dataclass
class SFTConfig:
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak rate, reached after the linear warm-up"})
    schedule: str = field(default="cosine", metadata={"help": "after warm-up: cosine (down to lr/10 at the end) "
                                                               "| constant"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    seed: int = field(default=0, metadata={"help": "seeds the example order"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints; 0 = at the end only"})
    keep_checkpoints: int = field(default=1, metadata={"help": "checkpoints kept"})

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("save_every", 0),
                          ("keep_checkpoints", 1)):
            check_int(name, getattr(self, name), low)
        for name, low_open in (("lr", True), ("grad_clip", True), ("weight_decay", False)):
            check_number(name, getattr(self, name), 0, low_open=low_open)
        check_choice("schedule", self.schedule, SCHEDULES)

    def train_config(self, *, progress: bool = True) -> TrainConfig:
        """The trainer's settings: warm-up + cosine to lr/10 (or flat after the warm-up), AdamW
        with torch's default betas, no router bias update, a metrics record every step."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           min_lr_ratio=0.1 if self.schedule == "cosine" else 1.0, weight_decay=self.weight_decay,
                           betas=ADAMW_BETAS, grad_clip=self.grad_clip, bias_update_gamma=0.0, seed=self.seed,
                           log_every=1, save_every=self.save_every, keep_checkpoints=self.keep_checkpoints,
                           progress=progress)


def sft_batch(tokenizer: Tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing tensors (ids, labels, attention_mask): input_ids (B, L) int64, labels
    (B, L) int64 (the answer tokens and the EOS; IGNORE_INDEX elsewhere), attention_mask (B, L)
    bool."""
    if not examples:
        raise ValueError("no examples for an SFT batch")
    seqs, starts = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        seqs.append(prompt + tokenizer.encode(ex.answer) + [tokenizer.eos_id])
        starts.append(len(prompt))               # index of the first answer token
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = True
        labels[i, start:len(s)] = input_ids[i, start:len(s)]
    return input_ids, labels, attention_mask


class SFTExamples:
    """The trainer's data source: `next_batch(n)` is `sft_batch` of the next n examples of a
    seeded shuffle (`PromptSampler`); the position is the resumable state."""

    def __init__(self, tokenizer: Tokenizer, dataset: Sequence[Example], seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.sampler = PromptSampler(dataset, seed=seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sft_batch(self.tokenizer, self.sampler.take(batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.sampler.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.position = state["position"]


class SupervisedFinetuning:
    """The SFT objective: mean cross-entropy over the answer and EOS targets; every parameter
    trains; the router bias stays as it is."""

    name = "sft"
    updates_router_bias = False

    def settings(self) -> dict:
        return {"objective": self.name}

    @staticmethod
    def trainable(name: str) -> bool:
        return True

    def __call__(self, model: DSV32ForCausalLM, batch: tuple[torch.Tensor, ...]) -> StepResult:
        input_ids, labels, attention_mask = unpack_batch(batch)
        logits = model(input_ids, attention_mask=attention_mask).logits             # (B, L, V)
        loss, metrics = lm_loss(logits, labels, attention_mask)
        return StepResult(loss=loss, metrics=metrics, tokens=int(metrics["tokens"]))


def train_sft(model: DSV32ForCausalLM, tokenizer: Tokenizer, dataset: Sequence[Example], config: SFTConfig, *,
              out_dir: str | Path | None = None, metrics_name: str = "metrics.jsonl", resume: bool | str = False,
              run_info: dict[str, Any] | None = None, show_progress: bool = True,
              stop: Callable[[dict[str, Any]], bool] | None = None,
              dist: DistInfo | None = None) -> list[dict[str, Any]]:
    """Fine-tune `model` in place on `dataset` with the shared trainer; returns the metrics records
    of the steps run (step, loss, lr, grad_norm, ...). out_dir: where `metrics_name` and
    `checkpoints/` go (None: nothing is written); resume: continue the run there (True: its
    latest checkpoint). stop(record), called after every step, ends training early by returning
    True (e.g. once a validation accuracy is reached; the "constant" schedule suits a run of
    unknown length). dist: the torchrun process group, `model` already sharded
    (`distributed.shard_model`): each rank trains on its slice of every global batch."""
    trainer = Trainer(model, SupervisedFinetuning(), SFTExamples(tokenizer, dataset, seed=config.seed),
                      config.train_config(progress=show_progress), out_dir, run_info=run_info,
                      metrics_name=metrics_name, dist=dist)
    history = trainer.fit(resume=resume, stop=stop)
    model.eval()
    return history
