"""The lightning indexer of DeepSeek Sparse Attention (docs/math.md §4-5): its projections and numerics.

    qI = W_Iq c_q -> (B, T, H_I, d_I)          kI = LayerNorm(W_Ik x) -> (B, S, d_I)
    w  = W_Iw x * H_I^-0.5 (float32)           RoPE (half-split) on the first d_r dims of qI, kI
    I(t, s) = sum_j w(t, j) * d_I^-0.5 * ReLU(qI(t, j) . kI(s))
    S_t = top-k over allowed s (causal, not padding), k_eff = min(k, #allowed)

The scores and the top-k selection are kernels (`dsv32.kernels.select_topk`: reference, torch
and Triton backends behind one dispatch). Selection is a function of the scores alone: keys
rank by (score descending, key slot ascending), so among equal scores the earlier key wins,
whatever the chunking (one-shot, chunked prefill, decode) or the backend. k is read at call
time (`select(..., topk=)`, default `config.index_topk`), so another k needs no new model.

Deployment numerics (`fp8=True`): a Hadamard rotation of qI and kI (orthogonal, dot products
unchanged in exact arithmetic) then FP8-e4m3 quantise-dequantise with power-of-two scales per
128-wide block (`dsv32.fp8`), as production does; scores are then computed from the dequantised
values.

Slots versus positions: keys are addressed by *slot* (their index along S); causality is by
slot, so with left padding slots and RoPE positions differ (see `kernels/torch_indexer.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8, kernels
from ..config import ModelConfig
from ..kernels import allowed_keys, index_scores  # noqa: F401  (the DSA losses import them from here)
from .norms import Float32Linear
from .rope import apply_rope_half



def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix (n a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.config = cfg                  # index_topk is read from it at call time
        self.window, self.sink = cfg.index_window, cfg.index_sink
        self.fp8 = cfg.index_fp8
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Float32Linear(cfg.hidden_size, self.n_heads, bias=False)

    # -------------------------------------------------------------------------------
    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """kI (B, T, d_I) float32, RoPE'd (and FP8-rounded when `fp8`)."""
        k = self.k_norm(self.wk(x)).float()
        k = torch.cat((apply_rope_half(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim:]), -1)
        return self._numerics(k)

    def queries(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qI (B, T, H_I, d_I) float32 and head weights w (B, T, H_I) float32, with the
        H_I^-0.5 and d_I^-0.5 scales folded into w."""
        B, T, _ = c_q.shape
        q = self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim).float()
        q = torch.cat((apply_rope_half(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim:]), -1)
        w = F.linear(x.float(), self.weights_proj.weight.float())
        w = w * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return self._numerics(q), w

    def _numerics(self, t: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return t
        h = hadamard_matrix(self.head_dim, device=t.device)
        return fp8.roundtrip(t @ h)

    # -------------------------------------------------------------------------------
    def select(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_start: int = 0,
               key_valid: torch.Tensor | None = None, backend: str = "auto",
               topk: int | None = None, ordered: bool = True) -> torch.Tensor:
        """Selected key slots (B, T, window + sink + min(topk, S)) int64, -1 for empty slots;
        see `kernels.select_topk` (and its `ordered`). `topk` None = `config.index_topk`."""
        k_sel = self.config.index_topk if topk is None else topk
        return kernels.select_topk(q, w, k, k_sel, q_start=q_start, key_valid=key_valid,
                                   window=self.window, sink=self.sink, backend=backend, ordered=ordered)
