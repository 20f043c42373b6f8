"""How parameters change each step: AdamW with decoupled weight decay on matrices only, a
linear warm-up + cosine learning-rate schedule, and DeepSeekMoE's auxiliary-loss-free router
bias update (docs/math.md §6).

    lr(step) = peak * (step + 1) / warmup                                  step < warmup
             = peak * (min_ratio + (1 - min_ratio) * (1 + cos(pi * u)) / 2),  u = (step - warmup) / (total - warmup)
    b_e     += gamma * sign(mean_e' load_e' - load_e)                      after each optimizer step

The schedule is a pure function of the step, so resuming needs only the step count. Each
parameter group carries its own `peak_lr` (the indexer may train at another rate than the
rest); the schedule scales every group's peak by the same factor.

Left out: other optimizers (Muon, Adafactor) and per-layer learning-rate decay.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """The schedule's multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    u = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u))


def param_groups(model: nn.Module, trainable: Callable[[str], bool], *, lr: float, weight_decay: float,
                 lr_overrides: Iterable[tuple[str, float]] = ()) -> list[dict]:
    """AdamW groups over the parameters `trainable(name)` accepts: matrices (and stacked expert
    weights) decay, vectors (norm weights, biases) do not, as is usual since GPT-2.
    `lr_overrides` pairs a name substring with its own peak lr (first match wins), e.g.
    ((".indexer.", 1e-3),). Sets requires_grad accordingly: frozen parameters get no gradient."""
    overrides = list(lr_overrides)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        train = trainable(name)
        p.requires_grad_(train)
        if not train:
            continue
        peak = next((value for key, value in overrides if key in name), lr)
        groups.setdefault((peak, p.dim() >= 2), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: the objective froze every parameter of this model")
    return [{"params": params, "peak_lr": peak, "lr": peak, "weight_decay": weight_decay if decay else 0.0}
            for (peak, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def build_optimizer(groups: list[dict], *, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to `peak_lr * factor`; returns the first group's lr (for logs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def update_router_bias(model: nn.Module, expert_load: dict[int, torch.Tensor], gamma: float) -> dict[str, float]:
    """Auxiliary-loss-free balancing: for each MoE layer with a recorded load (E,) (token counts
    of the whole optimizer step), nudge `e_score_correction_bias` by gamma toward balance:
    under-loaded experts up, over-loaded down. Returns {"expert_imbalance": mean over layers of
    max load / mean load} measured before the update (1.0 = balanced)."""
    if gamma < 0:
        raise ValueError(f"gamma (bias update speed) must be >= 0, got {gamma}")
    ratios = []
    for idx, load in expert_load.items():
        gate = model.layer(idx).mlp.gate          # main and MTP layers alike
        load = load.to(torch.float32)
        mean = load.mean()
        if mean > 0:
            ratios.append(float(load.max() / mean))
        if gamma:
            gate.e_score_correction_bias.add_(gamma * torch.sign(mean - load).to(gate.e_score_correction_bias))
    return {"expert_imbalance": sum(ratios) / len(ratios)} if ratios else {}
