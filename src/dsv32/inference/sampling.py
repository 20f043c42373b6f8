"""Next-token sampling with the records RL needs.

For each row: temperature, then top-k, then top-p on the renormalised remainder (the usual
order), then a draw from the truncated, renormalised distribution. What comes back for the
drawn token:

    logprob       log-probability under the distribution actually sampled from
                  (after truncation and renormalisation; 0 for greedy)
    logprob_full  log-probability under the untruncated distribution softmax(logits / T)
                  (T = 1 for greedy)
    kept          the kept token ids of the truncation, sorted by probability, compact:
                  (B, K_max) int64 padded with -1; None when nothing was truncated

GRPO's "keep sampling mask" recomputes pi_theta over exactly `kept` (at the same
temperature), so that pi_theta and pi_old share one action space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


@dataclass
class Sample:
    tokens: torch.Tensor          # (B,) int64
    logprob: torch.Tensor         # (B,) float32
    logprob_full: torch.Tensor    # (B,) float32
    kept: torch.Tensor | None     # (B, K_max) int64, -1 padded; None = all tokens kept


def kept_mask(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Boolean (B, V) mask of the tokens top-k/top-p keep (None = all). `logits` (B, V) are
    already divided by the temperature."""
    if not params.truncates:
        return None
    B, V = logits.shape
    order = logits.argsort(dim=-1, descending=True)
    ranked = logits.gather(-1, order)
    keep_sorted = torch.ones(B, V, dtype=torch.bool, device=logits.device)
    if params.top_k > 0:
        keep_sorted[:, params.top_k:] = False
    if params.top_p < 1.0:
        probs = torch.softmax(ranked.masked_fill(~keep_sorted, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs                 # mass strictly before each token
        keep_sorted &= before < params.top_p              # the smallest prefix reaching top_p
        keep_sorted[:, 0] = True
    mask = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    return mask.scatter_(-1, order, keep_sorted)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator] | None = None) -> Sample:
    """Draw one token per row of `logits` (B, V) with per-row generators (for seeds that do
    not depend on the batch a prompt sits in)."""
    logits = logits.float()
    B = logits.shape[0]
    if params.greedy:
        tokens = logits.argmax(-1)
        full = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return Sample(tokens, torch.zeros(B, device=logits.device), full, tokens[:, None].clone())
    scaled = logits / params.temperature
    full_logp = torch.log_softmax(scaled, -1)
    mask = kept_mask(scaled, params)
    logp = full_logp if mask is None else torch.log_softmax(scaled.masked_fill(~mask, float("-inf")), -1)
    probs = logp.exp()
    try:
        if generators is None:
            tokens = torch.multinomial(probs, 1).squeeze(-1)
        else:
            tokens = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    except RuntimeError as e:    # the draw is where NaN/inf logits surface; checking earlier costs a sync
        if bool(torch.isfinite(logits).all()):
            raise
        raise FloatingPointError("the model's logits hold NaN or inf: its weights or activations overflowed "
                                 f"(temperature {params.temperature})") from e
    chosen = tokens[:, None]
    kept = None
    if mask is not None:
        counts = mask.sum(-1)
        k_max = int(counts.max())
        top = logp.topk(k_max, dim=-1).indices           # kept tokens first, by probability
        kept = torch.where(torch.arange(k_max, device=logits.device)[None] < counts[:, None], top, -1)
    return Sample(tokens, logp.gather(-1, chosen).squeeze(-1), full_logp.gather(-1, chosen).squeeze(-1), kept)
