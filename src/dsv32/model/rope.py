"""Rotary position embeddings with YaRN, in the two layouts V3.2 uses.

* MLA rotates its `d_r` rope dims in **interleaved** pairs `(x0, x1), (x2, x3), ...`.
* The lightning indexer rotates the first `d_r` dims of its query/key **half-split**
  (`x[:d/2]` pairs with `x[d/2:]`). Interleaving it there is a known upstream bug (docs/math.md §2).

Both use the same frequencies and the same YaRN `attention_factor` on cos/sin. The YaRN
details (correction range with floor/ceil unless `truncate` is false, the linear ramp, the
`attention_factor` default `g(mscale)/g(mscale_all_dim)`) follow transformers'
`modeling_rope_utils`, which agrees with DeepSeek's reference for the released config.

Frequencies are recomputed from the config on first use per device instead of living in a
buffer, so a model built on the meta device and materialised later needs no re-init.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `(d_r/2,)` in float32 and the cos/sin multiplier (`attention_factor`)."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type") != "yarn":
        return inv_freq, 1.0
    factor = cfg.yarn_factor
    original = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Returns `(cos, sin)`, each `(B, T, d_r/2)` float32, for integer positions `(B, T)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._cache:
            self._cache[device] = rope_parameters(self.cfg, device)
        inv_freq, attention_factor = self._cache[device]
        angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, d_r/2)
        return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs `(x[2i], x[2i+1])` of `x (B, T, [heads,] d_r)` in place of the layout.

    `cos`/`sin` are `(B, T, d_r/2)`; they broadcast over a heads axis when `x` has one."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x[:d/2]` against `x[d/2:]` (the non-interleaved layout), `x (B, T, [heads,] d_r)`."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
