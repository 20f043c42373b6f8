"""Language-modelling losses as small pure functions: next-token cross-entropy and the
multi-token-prediction (MTP) loss. Each returns `(loss, metrics)` with detached 0-dim metrics.

Shape legend: B batch, T positions, V vocabulary.

Labels follow Hugging Face's convention: `labels` (B, T) is aligned with the input ids, the
label at position t is the token that position t should hold, and `IGNORE_INDEX` (-100) marks
a position that is not trained on. The loss shifts: logits[:, t] predict labels[:, t + 1]. To
train on every token pass the ids themselves as labels; SFT and task examples set the prompt's
labels to -100 (answer-only loss). Left out on purpose: label smoothing and z-loss
(DeepSeek-V3 uses neither).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]
IGNORE_INDEX = -100


def _check_labels(labels: torch.Tensor, like: torch.Tensor, what: str) -> None:
    if labels.dim() != 2 or labels.shape != like.shape[:2]:
        raise ValueError(f"labels (B, T) must match {what} {tuple(like.shape[:2])}, got {tuple(labels.shape)}")


def _counted(labels: torch.Tensor, attention_mask: torch.Tensor | None, shift: int) -> torch.Tensor:
    """(B, T - shift) bool: target t + shift counts for the prediction made at position t — its
    label is not IGNORE_INDEX and, with a mask, both positions are real tokens."""
    T = labels.shape[1]
    counted = labels[:, shift:] != IGNORE_INDEX
    if attention_mask is not None:
        valid = attention_mask.bool()
        counted = counted & valid[:, :T - shift] & valid[:, shift:]
    return counted


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of float32 cross-entropy of logits (B, N, V) against targets (B, N) over the counted
    (B, N) entries, and how many were counted. Ignored targets may hold any value (-100)."""
    safe = torch.where(counted, targets, 0)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    m = counted.reshape(-1).to(ce.dtype)
    return (ce * m).sum(), m.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Mean next-token cross-entropy over the counted targets: position t predicts labels[t+1].

    logits (B, T, V); labels (B, T), IGNORE_INDEX = not trained (the input ids themselves train
    every token); attention_mask (B, T) 1 = real token. Returns the loss and {"lm_loss",
    "tokens"} (tokens = counted targets; a batch with none gives a zero loss)."""
    _check_labels(labels, logits, "logits (B, T, V)")
    counted = _counted(labels, attention_mask, 1)
    total, count = _masked_ce(logits[:, :-1], labels[:, 1:], counted)
    loss = total / count.clamp(min=1)
    return loss, {"lm_loss": loss.detach(), "tokens": count.detach()}


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Mean over MTP depths of the cross-entropy of depth k, whose logits (B, T-k, V) at
    position i predict labels[i+k+1] (DeepSeek-V3 §2.2), with labels as in `lm_loss`.
    Returns the loss and {"mtp_loss"}. An empty list (no MTP modules, or a sequence too
    short) gives a zero loss."""
    if not mtp_logits:
        zero = torch.zeros((), device=labels.device)
        return zero, {"mtp_loss": zero}
    losses = []
    T = labels.shape[1]
    for depth, logits in enumerate(mtp_logits, start=1):
        n = T - depth - 1                              # positions with a target inside the sequence
        if n <= 0:
            continue
        counted = _counted(labels, attention_mask, depth + 1)
        total, count = _masked_ce(logits[:, :n], labels[:, depth + 1:], counted)
        losses.append(total / count.clamp(min=1))
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=labels.device)
    return loss, {"mtp_loss": loss.detach()}
