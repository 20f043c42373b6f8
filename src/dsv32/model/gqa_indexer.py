"""The lightning indexer retrofitted onto a dense GQA layer (docs/math.md, "DSA on a dense GQA model").

A GQA layer has no query latent c_q to borrow (V3.2's indexer reads MLA's), so the indexer brings
its own low-rank query path; everything after it is V3.2's indexer unchanged:

    c_I = RMSNorm(W_Ia x) -> (B, T, r_I)        qI = W_Iq c_I -> (B, T, H_I, d_I)         wq_a, q_norm, wq_b
    kI  = LayerNorm(W_Ik x) -> (B, S, d_I)      one key head shared by the H_I heads      wk, k_norm
    w   = W_Iw x * H_I^-0.5 * d_I^-0.5 (float32)                                           weights_proj
    RoPE (half-split) on the first d_r dims of qI and kI, with every (d / d_r)-th frequency of
    the model's own RoPE table, so positions (and Llama-3 scaling) mean what they mean to the model
    I(t, s) = sum_j w(t, j) * ReLU(qI(t, j) . kI(s));   S_t = top-k (kernels.select_topk)

Initialisation (`reset_parameters`): the indexer starts as a low-rank copy of kv group 0's own
attention geometry: kI takes k_proj's rows of group 0 (the rotated dims picked so each RoPE pair
stays a pair at the same frequency), the query path is the rank-r_I truncated SVD of the query
rows of group 0's heads (cycled when H_I exceeds them), and the head weights are small random.
The warm-up (stage 1) then starts from scores that already correlate with the dense attention of
one group instead of from noise. Left out: FP8 deployment numerics (V3.2's `index_fp8`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .gqa_config import DenseConfig
from .norms import Float32Linear, RMSNorm
from .rope import apply_rope_half


class GQAIndexer(nn.Module):
    def __init__(self, cfg: DenseConfig) -> None:
        super().__init__()
        spec = cfg.indexer
        assert spec is not None
        self.spec = spec                      # topk is read from it at call time unless overridden
        self.cfg = cfg
        self.n_heads, self.head_dim, self.rope_dim = spec.n_heads, spec.head_dim, spec.rope_dim
        self.stride = (cfg.head_dim // 2) // (spec.rope_dim // 2)   # every stride-th model frequency
        D = cfg.hidden_size
        self.wq_a = nn.Linear(D, spec.q_rank, bias=False)
        self.q_norm = RMSNorm(spec.q_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(spec.q_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(D, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Float32Linear(D, self.n_heads, bias=False)

    # ------------------------------------------------------------------ numerics
    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, s = cos[..., :: self.stride], sin[..., :: self.stride]
        r = self.rope_dim
        return torch.cat((apply_rope_half(t[..., :r], c, s), t[..., r:]), -1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """kI (B, T, d_I) float32, RoPE'd. cos/sin are the model's tables (B, T, d/2)."""
        return self._rope(self.k_norm(self.wk(x)).float(), cos, sin)

    def queries(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qI (B, T, H_I, d_I) float32 and head weights w (B, T, H_I) float32 with the H_I^-0.5 and
        d_I^-0.5 scales folded in. `c_q` is the input of the low-rank query path: the layer's
        normed hidden state (the same tensor as x; kept as an argument for the shared DSA losses)."""
        B, T, _ = c_q.shape
        q = self.wq_b(self.q_norm(self.wq_a(c_q))).view(B, T, self.n_heads, self.head_dim).float()
        w = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return self._rope(q, cos, sin), w

    def select(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_start: int = 0,
               key_valid: torch.Tensor | None = None, backend: str = "auto",
               topk: int | None = None) -> torch.Tensor:
        """Selected key slots (B, T, window + sink + min(topk, S)), -1 = empty (kernels.select_topk)."""
        return kernels.select_topk(q, w, k, self.spec.topk if topk is None else topk, q_start=q_start,
                                   key_valid=key_valid, window=self.spec.window, sink=self.spec.sink,
                                   backend=backend)

    # ------------------------------------------------------------------ initialisation
    def _model_dims(self) -> torch.Tensor:
        """Which of the model's head dims feed the indexer's d_I dims: rotated pairs first (model
        dims j*stride and d/2 + j*stride, at the same frequency), then unrotated fill."""
        d, half, r2 = self.cfg.head_dim, self.cfg.head_dim // 2, self.rope_dim // 2
        lo = torch.arange(r2) * self.stride
        rotary = torch.cat((lo, lo + half))
        rest = torch.tensor([i for i in range(d) if i not in set(rotary.tolist())], dtype=torch.long)
        if not len(rest):                      # every model dim is rotated: fill with them again
            rest = torch.arange(d)
        fill = self.head_dim - self.rope_dim
        rest = rest.repeat(fill // len(rest) + 1)[:fill]
        return torch.cat((rotary, rest))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, attn: nn.Module | None = None) -> None:
        """Random start, or with `attn` (the layer's GQAttention) the copy of group 0's geometry
        described in the module docstring."""
        std = self.cfg.initializer_range
        for lin in (self.wq_a, self.wq_b, self.wk, self.weights_proj):
            lin.weight.normal_(0.0, std, generator=generator)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()
        if attn is None:
            return
        d, per_group = self.cfg.head_dim, self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        dims = self._model_dims().to(attn.k_proj.weight.device)
        self.wk.weight.copy_(attn.k_proj.weight[:d][dims].float())
        heads = [h % per_group for h in range(self.n_heads)]
        wq = attn.q_proj.weight.float().view(-1, d, attn.q_proj.weight.shape[-1])
        stacked = torch.cat([wq[h][dims] for h in heads])                  # (H_I * d_I, D)
        U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        r = min(self.spec.q_rank, S.numel())
        a = torch.zeros_like(self.wq_a.weight)
        b = torch.zeros_like(self.wq_b.weight)
        # wq_b(q_norm(wq_a x)): q_norm rescales c_I to unit RMS, so put the scale on wq_b.
        a[:r] = Vh[:r]
        b[:, :r] = U[:, :r] * S[:r]
        self.wq_a.weight.copy_(a)
        self.wq_b.weight.copy_(b)
