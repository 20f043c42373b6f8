"""Supervised warm start for RL: teacher-forced cross-entropy on prompt -> answer examples,
with the loss on the answer tokens (and the closing EOS) only.

Shape legend: B examples, T = the longest prompt + answer + EOS, minus one.

    sequence   encode_prompt(prompt) + encode(answer) + [EOS]      (BOS first when the tokenizer has one)
    inputs     sequence[:-1]     right-padded with the pad id        (B, T)
    targets    sequence[1:]      -100 where the target is a prompt token or padding   (B, T)

The prompt is encoded exactly as GRPO encodes it (`datasets.encode_prompt`), so a model
trained here is sampled from the same token sequences later. EOS is a target so that the model
learns to stop after the answer — the exact-match rewards give 0 to anything that follows it.

Left out on purpose: packing several examples into one sequence, and checkpoint/resume (this is
a short warm start; the model is saved once at the end by the caller). The general trainer
(pretraining, DSA stages) lives in `dsv32.training`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import DSV32ForCausalLM
from ..tokenizer import Tokenizer
from ..training.tasks import Example
from ..validation import check_choice, check_int, check_number
from .datasets import PromptSampler, encode_prompt
from .state import MetricsLog, progress

IGNORE = -100
SCHEDULES = ("cosine", "constant")


@dataclass
class SFTConfig:
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak rate, reached after the linear warm-up"})
    schedule: str = field(default="cosine", metadata={"help": "after warm-up: cosine (down to lr/10 at the last "
                                                               "step) | constant"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    seed: int = field(default=0, metadata={"help": "seeds the example order"})

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0)):
            check_int(name, getattr(self, name), low)
        for name, low_open in (("lr", True), ("grad_clip", True), ("weight_decay", False)):
            check_number(name, getattr(self, name), 0, low_open=low_open)
        check_choice("schedule", self.schedule, SCHEDULES)

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step` (1-based)."""
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def sft_batch(tokenizer: Tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing tensors: inputs (B, T) int64, attention mask (B, T) bool, targets (B, T)
    int64 with -100 everywhere but answer and EOS targets."""
    if not examples:
        raise ValueError("no examples for an SFT batch")
    seqs, starts = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        seqs.append(prompt + tokenizer.encode(ex.answer) + [tokenizer.eos_id])
        starts.append(len(prompt) - 1)           # target index of the first answer token
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        n = len(s) - 1
        inputs[i, :n] = torch.tensor(s[:-1])
        mask[i, :n] = True
        targets[i, start:n] = torch.tensor(s[start + 1:])
    return inputs, mask, targets


def sft_loss(model: DSV32ForCausalLM, inputs: torch.Tensor, mask: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer targets."""
    logits = model(inputs, attention_mask=mask).logits.float()                   # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def train_sft(model: DSV32ForCausalLM, tokenizer: Tokenizer, dataset: Sequence[Example], config: SFTConfig, *,
              metrics_path: str | Path | None = None, show_progress: bool = True,
              stop: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """Fine-tune `model` in place on `dataset`; returns one metrics record per step (step, loss,
    lr, grad_norm), also written to `metrics_path` (JSONL) when given. stop(record), called
    after every step, ends training early by returning True (e.g. once a validation accuracy
    is reached; the "constant" schedule suits a run of unknown length)."""
    cfg = config
    sampler = PromptSampler(dataset, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log = MetricsLog(metrics_path) if metrics_path is not None else None
    bar = progress(cfg.steps, 0, "sft") if show_progress else None
    history = []
    model.train()
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = sft_loss(model, *sft_batch(tokenizer, sampler.take(cfg.batch_size)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": norm.item()}
        history.append(record)
        if log is not None:
            log.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update()
        if stop is not None and stop(record):
            break
    if bar is not None:
        bar.close()
    model.eval()
    return history
