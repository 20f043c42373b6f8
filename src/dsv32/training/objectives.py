"""What the trainer optimises: an `Objective` turns (model, batch) into a loss, metrics and the
MoE expert loads, and says which parameters train and whether the router bias is updated.

The trainer knows nothing about stages; the stages are objectives:

* `LanguageModeling` — pretraining (dense attention by default): next-token loss, optional
  sequence-wise balance loss and MTP loss;
* `dsa.IndexerWarmup`, `dsa.SparseTraining` — the two DSA conversion stages (docs/math.md §8).

The SFT warm start is an objective too (`dsv32.rl.sft.SupervisedFinetuning`).

A batch (what a data source's `next_batch` returns) is either ids (B, T), every token trained,
or a tuple (ids, labels) or (ids, labels, attention_mask) — `data.TokenBatch` — with labels
(B, T) in Hugging Face's convention (`losses`: -100 = not trained). `unpack_batch` reads all
three. Left out:
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


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids, labels, attention_mask or None) of a batch: a tensor of ids is its own labels."""
    if isinstance(batch, torch.Tensor):
        return batch, batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        ids, labels, *mask = batch
        if labels.shape != ids.shape:
            raise ValueError(f"labels must have the shape of the ids (B, T) {tuple(ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        return ids, labels, (mask[0] if mask else None)
    raise TypeError("a batch must be ids (B, T) or a tuple (ids, labels[, attention_mask]), got "
                    f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def trained_tokens(ids: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor) -> int:
    """The batch's token count for the trainer: every token of an all-token batch, the counted
    targets of a labelled one (the trainer weighs each rank's loss by it)."""
    return ids.numel() if labels is ids else int(counted)


class LanguageModeling:
    """Next-token prediction over every labelled position (every position of a plain ids
    batch), plus `balance_alpha` x the sequence-wise
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

    def __call__(self, model: DSV32ForCausalLM, batch) -> StepResult:
        ids, labels, mask = unpack_batch(batch)
        out = model(ids, mask, attention=self.attention, records=Records(balance_alpha=self.balance_alpha),
                    compute_mtp=self.mtp_weight > 0)
        loss, metrics = language_model_terms(out, labels, self.mtp_weight, mask)
        return StepResult(loss=loss, metrics=metrics, expert_load=out.expert_load,
                          tokens=trained_tokens(ids, labels, metrics["tokens"]))


def language_model_terms(out: ModelOutput, labels: torch.Tensor, mtp_weight: float,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM loss over `labels` (losses.lm_loss) + the model's balance loss (already times alpha)
    + mtp_weight x MTP loss over the same labels."""
    loss, metrics = lm_loss(out.logits, labels, attention_mask)
    metrics = dict(metrics)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
        metrics["balance_loss"] = out.aux_loss.detach()
    if mtp_weight > 0:
        m_loss, m = mtp_loss(out.mtp_logits, labels, attention_mask)
        loss = loss + mtp_weight * m_loss
        metrics.update(m)
    return loss, metrics
