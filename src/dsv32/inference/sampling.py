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

The draw is by inverse CDF, for all rows at once: row b takes the first token whose cumulative
probability exceeds u_b * (total mass), u_b ~ U[0, 1) -- over the kept tokens in the order of
the one sort top-k/top-p truncate with, or over the vocabulary in id order when nothing is
truncated (no sort then). With per-row seeds, u_b comes from a counter-based
stream: a hash of (seed_b, step) (`row_uniforms`), so a row draws the same tokens whatever
batch it sits in, with no per-row generator and no per-row loop; without seeds u comes from
the global generator.
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


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, 'lowbias32') on int64 tensors holding values in
    [0, 2^32). The multipliers are below 2^31, so no product leaves the int64 range."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """U[0, 1) float64 from per-row int64 seeds (B,) and a step counter: the value of row b
    depends on (seeds[b], step) only, not on the batch (53 random bits each). step: an int ->
    (B,); int64 steps (S,) -> (B, S), every step of a generation in one call (the same values)."""
    key = _mix32(_mix32((seeds >> 32) & _MASK32) ^ (seeds & _MASK32))
    step = torch.as_tensor(step, dtype=torch.long, device=seeds.device)
    if step.dim():
        key = key[:, None]
    hi = _mix32(key ^ _mix32((2 * step) & _MASK32))
    lo = _mix32(key ^ _mix32((2 * step + 1) & _MASK32))
    return ((hi << 21) + (lo >> 11)).double() * 2.0 ** -53


def _keep_sorted(ranked: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Which of the logits `ranked` (B, V), sorted in decreasing order, top-k/top-p keep: a
    prefix of each row (bool (B, V))."""
    B, V = ranked.shape
    keep = torch.ones(B, V, dtype=torch.bool, device=ranked.device)
    if params.top_k > 0:
        keep[:, params.top_k:] = False
    if params.top_p < 1.0:
        probs = torch.softmax(ranked.masked_fill(~keep, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs                 # mass strictly before each token
        keep &= before < params.top_p                     # the smallest prefix reaching top_p
        keep[:, 0] = True
    return keep


def kept_mask(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Boolean (B, V) mask of the tokens top-k/top-p keep (None = all). `logits` (B, V) are
    already divided by the temperature."""
    if not params.truncates:
        return None
    ranked, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(-1, order, _keep_sorted(ranked, params))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position (B,) of the first entry of each row of `probs` (B, V) whose cumulative sum
    exceeds u * (row sum), for u (B,) in [0, 1): a draw from the row's distribution. Never a
    zero-probability entry: rounding past the end falls back to the last positive one, and
    zero entries (which never raise the cumulative sum) are never the first to exceed."""
    cdf = probs.double().cumsum(-1)
    pos = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    last = (probs > 0).flip(-1).int().argmax(-1)                 # zeros at the end of the row
    return torch.minimum(pos, probs.shape[-1] - 1 - last)


def sample_next(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor | None = None,
                step: int = 0, uniforms: torch.Tensor | None = None) -> Sample:
    """Draw one token per row of `logits` (B, V). seeds: int64 (B,), one per row, with `step`
    the position in the row's random stream (for draws that do not depend on the batch a
    prompt sits in); None draws from the global generator. uniforms: the draws (B,) float64
    themselves, `row_uniforms(seeds, step)` computed ahead (generate makes all steps' at once)."""
    logits = logits.float()
    B = logits.shape[0]
    if params.greedy:
        tokens = logits.argmax(-1)
        full = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return Sample(tokens, torch.zeros(B, device=logits.device), full, tokens[:, None].clone())
    scaled = logits / params.temperature
    full_logp = torch.log_softmax(scaled, -1)
    # NaN/inf logits would otherwise draw a silent garbage token: one sync per step names them.
    if not bool(torch.isfinite(torch.logsumexp(scaled, -1)).all()):
        raise FloatingPointError("the model's logits hold NaN or inf: its weights or activations overflowed "
                                 f"(temperature {params.temperature})")
    if uniforms is not None:
        u = uniforms.to(device=logits.device, dtype=torch.float64)
    elif seeds is not None:
        u = row_uniforms(seeds.to(logits.device), step)
    else:
        u = torch.rand(B, dtype=torch.float64, device=logits.device)
    if not params.truncates:                           # no kept set to find: no sort either
        tokens = inverse_cdf(full_logp.exp(), u)[:, None]
        full = full_logp.gather(-1, tokens).squeeze(-1)
        return Sample(tokens.squeeze(-1), full, full, None)
    ranked, order = scaled.sort(dim=-1, descending=True)
    keep = _keep_sorted(ranked, params)
    logp_sorted = torch.log_softmax(ranked.masked_fill(~keep, float("-inf")), -1)
    pos = inverse_cdf(logp_sorted.exp(), u)[:, None]                   # (B, 1) in sorted order
    tokens = order.gather(-1, pos)
    k_max = int(keep.sum(-1).max())                    # the record's width: a shape, so one sync
    kept = order[:, :k_max].masked_fill(~keep[:, :k_max], -1)          # kept ids, by probability
    return Sample(tokens.squeeze(-1), logp_sorted.gather(-1, pos).squeeze(-1),
                  full_logp.gather(-1, tokens).squeeze(-1), kept)
