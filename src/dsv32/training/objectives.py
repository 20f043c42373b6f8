"""What the trainer optimises: an `Objective` turns (model, batch) into a loss, metrics and the
MoE expert loads, and says which parameters train and whether the router bias is updated.

The trainer knows nothing about stages; the stages are objectives:

* `LanguageModeling` — pretraining (dense attention by default): next-token loss, optional
  sequence-wise balance loss and MTP loss;
* `dsa.IndexerWarmup`, `dsa.SparseTraining` — the two DSA conversion stages (docs/math.md §8).

The SFT warm start is an objective too (`dsv32.rl.sft.SupervisedFinetuning`). Left out:
distillation, and GRPO, whose loop (rollouts, reference, several updates per batch) composes
`dsv32.rl` itself and shares the checkpoints and metrics log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..model import AttentionOptions, DSV32ForCausalLM, ModelOutput, Records
from .losses import lm_loss, mtp_loss


@dataclass
class StepResult:
    loss: torch.Tensor                                       # 0-dim; what backward() runs on
    metrics: dict[str, torch.Tensor]                         # detached 0-dim tensors, logged
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> (E,) token counts
    tokens: int = 0                                          # tokens in the batch


class Objective(Protocol):
    name: str
    updates_router_bias: bool       # apply the auxiliary-loss-free bias update after each step

    def settings(self) -> dict: ...            # what must match when a run is resumed
    def trainable(self, name: str) -> bool: ...   # parameter name -> trains in this objective
    def __call__(self, model: DSV32ForCausalLM, batch) -> StepResult: ...   # a DataSource's batch


class LanguageModeling:
    """Next-token prediction over every position, plus `balance_alpha` x the sequence-wise
    balance loss (the model computes it) and `mtp_weight` x the MTP loss. All parameters
    train except the indexers, which the LM loss never reaches (selection runs under
    no_grad) and which the DSA stages train."""

    name = "language_modeling"
    updates_router_bias = True

    def __init__(self, *, attention: AttentionOptions | None = None, balance_alpha: float = 0.0,
                 mtp_weight: float = 0.0) -> None:
        if balance_alpha < 0:
            raise ValueError(f"balance_alpha must be >= 0, got {balance_alpha}")
        if mtp_weight < 0:
            raise ValueError(f"mtp_weight must be >= 0, got {mtp_weight}")
        self.attention = attention or AttentionOptions(sparse=False)
        self.balance_alpha, self.mtp_weight = balance_alpha, mtp_weight

    def settings(self) -> dict:
        return {"objective": self.name, "sparse": self.attention.sparse, "balance_alpha": self.balance_alpha,
                "mtp_weight": self.mtp_weight}

    @staticmethod
    def trainable(name: str) -> bool:
        return ".indexer." not in name

    def __call__(self, model: DSV32ForCausalLM, input_ids: torch.Tensor) -> StepResult:
        out = model(input_ids, attention=self.attention, records=Records(balance_alpha=self.balance_alpha),
                    compute_mtp=self.mtp_weight > 0)
        loss, metrics = language_model_terms(out, input_ids, self.mtp_weight)
        return StepResult(loss=loss, metrics=metrics, expert_load=out.expert_load, tokens=input_ids.numel())


def language_model_terms(out: ModelOutput, input_ids: torch.Tensor,
                         mtp_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM loss + the model's balance loss (already times alpha) + mtp_weight x MTP loss."""
    loss, metrics = lm_loss(out.logits, input_ids)
    metrics = dict(metrics)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
        metrics["balance_loss"] = out.aux_loss.detach()
    if mtp_weight > 0:
        m_loss, m = mtp_loss(out.mtp_logits, input_ids)
        loss = loss + mtp_weight * m_loss
        metrics.update(m)
    return loss, metrics
