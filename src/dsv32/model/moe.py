"""DeepSeekMoE (docs/math.md §6): sigmoid router with group-limited top-k and a selection-only bias,
routed SwiGLU experts, shared experts, and the dense SwiGLU MLP of the first layers.

    s  = sigmoid(x W_g^T) (float32);  s' = s + e_score_correction_bias (selection only)
    group score = sum of the top-2 s' per group; keep topk_group groups; top-k experts on s'
    weights = s[selected] / sum (if norm_topk_prob) * routed_scaling_factor
    y = sum_e weights_e * SwiGLU_e(x) + SwiGLU_shared(x)

Routing can be recorded (the chosen expert ids per token) and replayed (given ids, the gate
weights are recomputed on those experts), which GRPO's "keep routing" needs.

Expert weights are stored stacked, (E, I, D) / (E, D, I); the checkpoint key map splits them
into the per-expert keys of the HF layout. Dispatch sorts the assignments by expert, then runs
either three batched matmuls over every expert's rows padded to the busiest expert's count
(when that at most doubles the rows: few ops for the small batches of decode and RL) or one
matmul triple per expert that received tokens; grouped GEMM kernels are left to a GPU backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .context import ForwardContext
from .norms import Float32Params

# One expert's matmul triple in the looped form costs about as much per-call overhead as this
# many rows of matmul work (CPU, fp32, forward+backward): the grouped form pays for its padding
# rows instead, so it runs while the padding stays under this many rows per expert.
_LOOP_CALL_ROWS = 64


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). `bias` for the dense families that have one (Llama's
    mlp_bias); DeepSeek's have none."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None, layer_idx: int = -1) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(Float32Params):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.num_experts = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid affinities s (N, E) float32."""
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """Expert ids (N, top_k) by group-limited top-k on s + bias."""
        choice = s.detach() + self.e_score_correction_bias
        N = choice.shape[0]
        if self.n_group > 1:
            grouped = choice.view(N, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)              # (N, G)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones(N, self.n_group, dtype=torch.bool, device=s.device).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(N, -1)
        return choice.topk(self.top_k, dim=-1).indices

    def weights(self, s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = s.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """x (N, D) -> (weights (N, k) float32, ids (N, k) int64, s (N, E) float32).
        `replay` (N, k): expert ids to use instead of selecting; a row of -1 selects freshly."""
        s = self.scores(x)
        if replay is None:
            ids = self.select(s)
        else:
            if replay.shape != (x.shape[0], self.top_k):
                raise ValueError(f"replayed routing must have shape {(x.shape[0], self.top_k)}, "
                                 f"got {tuple(replay.shape)}")
            ids = replay.to(device=x.device, dtype=torch.long)
            free = (ids < 0).any(-1)
            if bool(free.any()):                 # -1 rows: positions with no record route freely
                ids = torch.where(free[:, None], self.select(s), ids)
        return self.weights(s, ids), ids, s


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids (N, k) expert ids, weights (N, k) -> sum_e weights_e SwiGLU_e(x) (N, D).

        Assignments are sorted by expert (stable), then computed in one of two ways with the
        same result: `grouped`, three batched matmuls over every expert's rows padded to the
        busiest expert's count (a fixed dozen ops whatever E: far fewer calls at the small
        token counts of decode and RL, where per-call overhead dominates), taken when the
        padding at most doubles the rows and adds at most `_LOOP_CALL_ROWS` rows per expert;
        else `looped`, one matmul triple per expert that received tokens (the reference; at
        the `small` preset's T = 2K training step, ~1.8x padding, it saves ~50 of ~940 ms)."""
        N, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0])
        busiest = int(counts.max()) if flat.numel() else 0       # a shape: the one host read
        padded = busiest * counts.numel()
        if 0 < padded <= 2 * flat.numel() and padded - flat.numel() <= _LOOP_CALL_ROWS * counts.numel():
            return self.grouped(x, flat, order, counts, busiest, weights)
        return self.looped(x, order, counts.tolist(), k, weights)

    def looped(self, x: torch.Tensor, order: torch.Tensor, counts: list[int], k: int,
               weights: torch.Tensor) -> torch.Tensor:
        token = order // k
        xs = x[token]
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            seg = xs[start:start + c]
            h = F.silu(seg @ self.gate_proj[e].t()) * (seg @ self.up_proj[e].t())
            outs.append(h @ self.down_proj[e].t())
            start += c
        ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def grouped(self, x: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
                C: int, weights: torch.Tensor) -> torch.Tensor:
        """Rows padded to C per expert: (E, C, D) through batched matmuls; padding rows are zero
        and dropped. Same sorted order and the same index_add_ as `looped`."""
        k = flat.numel() // x.shape[0]
        token = order // k
        expert = flat[order]                                               # (N k,) sorted
        slot = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        xs = x.new_zeros(counts.numel(), C, x.shape[1])
        xs[expert, slot] = x[token]                                        # (E, C, D)
        h = F.silu(torch.bmm(xs, self.gate_proj.transpose(1, 2))) * torch.bmm(xs, self.up_proj.transpose(1, 2))
        ys = torch.bmm(h, self.down_proj.transpose(1, 2))[expert, slot]    # (N k, D)
        ys = ys * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None, layer_idx: int = -1) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        replay = None
        replay_routing = None if ctx is None else ctx.records.replay_routing
        if replay_routing is not None and layer_idx in replay_routing:
            replay = replay_routing[layer_idx].reshape(B * T, -1)
        weights, ids, s = self.gate(flat, replay)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if ctx is not None:
            self._record(ctx, layer_idx, ids, s, B, T)
        return y.view(B, T, D)

    def _record(self, ctx: ForwardContext, layer_idx: int, ids: torch.Tensor, s: torch.Tensor,
                B: int, T: int) -> None:
        valid, rec = ctx.query_valid(T), ctx.records
        if rec.record_routing:
            rec.routing[layer_idx] = ids.view(B, T, -1).detach()
        with torch.no_grad():
            counted = ids if valid is None else ids[valid.reshape(-1)]
            rec.expert_load[layer_idx] = torch.bincount(counted.reshape(-1), minlength=self.num_experts)
        if rec.balance_alpha > 0:
            rec.balance_loss[layer_idx] = rec.balance_alpha * sequence_balance_loss(
                s.view(B, T, -1), ids.view(B, T, -1), self.top_k, valid)


def sequence_balance_loss(s: torch.Tensor, ids: torch.Tensor, top_k: int,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without alpha), averaged over the
    batch: sum_i f_i P_i with f_i = E/(k T) * #tokens choosing i, P_i = mean_t s_i / sum_j s_j.
    s (B, T, E) float32, ids (B, T, k), valid (B, T) bool or None."""
    B, T, E = s.shape
    m = torch.ones(B, T, device=s.device) if valid is None else valid.float()
    n = m.sum(1).clamp(min=1)                                               # (B,)
    chosen = torch.zeros(B, T, E, device=s.device).scatter_(-1, ids, 1.0)
    f = (chosen * m[..., None]).sum(1) * E / (top_k * n[:, None])          # (B, E)
    p = ((s / s.sum(-1, keepdim=True)) * m[..., None]).sum(1) / n[:, None]  # (B, E)
    return (f * p).sum(-1).mean()
