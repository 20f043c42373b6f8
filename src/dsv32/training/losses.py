"""Language-modelling losses as small pure functions: next-token cross-entropy and the
multi-token-prediction (MTP) loss. Each returns `(loss, metrics)` with detached 0-dim metrics.

Shape legend: B batch, T positions, V vocabulary.

`lm_loss` takes an optional loss mask over the target tokens: SFT counts the completion tokens
only (`dsv32.rl.sft`). Left out on purpose: label smoothing and z-loss (DeepSeek-V3 uses neither).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _shifted_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of float32 cross-entropy of logits (B, N, V) against targets (B, N) over mask (B, N),
    and the number of counted tokens."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return ce.sum(), torch.tensor(float(ce.numel()), device=ce.device)
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum(), m.sum()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Mean next-token cross-entropy: position t predicts token t+1.

    logits (B, T, V), input_ids (B, T), attention_mask (B, T) 1 = real token, loss_mask (B, T)
    1 = this token is a target that counts. A target counts when both it and its input position
    are real and the loss mask (if any) selects it. Returns the loss and {"lm_loss", "tokens"}."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits (B, T, V) must match input_ids (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(input_ids.shape)}")
    mask = None
    if attention_mask is not None:
        valid = attention_mask.bool()
        mask = valid[:, :-1] & valid[:, 1:]
    if loss_mask is not None:
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask must match input_ids (B, T), got {tuple(loss_mask.shape)} "
                             f"and {tuple(input_ids.shape)}")
        counted = loss_mask.bool()[:, 1:]
        mask = counted if mask is None else mask & counted
    total, count = _shifted_ce(logits[:, :-1], input_ids[:, 1:], mask)
    loss = total / count.clamp(min=1)
    return loss, {"lm_loss": loss.detach(), "tokens": count.detach()}


def mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Mean over MTP depths of the cross-entropy of depth k, whose logits (B, T-k, V) at
    position i predict token i+k+1 (DeepSeek-V3 §2.2). Returns the loss and {"mtp_loss"}.
    An empty list (no MTP modules, or a sequence too short) gives a zero loss."""
    if not mtp_logits:
        zero = torch.zeros((), device=input_ids.device)
        return zero, {"mtp_loss": zero}
    losses = []
    T = input_ids.shape[1]
    valid = None if attention_mask is None else attention_mask.bool()
    for depth, logits in enumerate(mtp_logits, start=1):
        n = T - depth - 1                              # positions with a target inside the sequence
        if n <= 0:
            continue
        mask = None if valid is None else valid[:, :n] & valid[:, depth + 1:]
        total, count = _shifted_ce(logits[:, :n], input_ids[:, depth + 1:], mask)
        losses.append(total / count.clamp(min=1))
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=input_ids.device)
    return loss, {"mtp_loss": loss.detach()}
