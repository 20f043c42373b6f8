"""Sparse absorbed-MLA attention in plain torch: gather the selected latent rows per block of
queries and attend only over them. Cost O(T·K·H·C), memory O(T·H·C + block·K·C); no T×S
tensor is ever built. Forward and backward are a custom autograd Function that saves only
the inputs, the output and the log-sum-exp (the backward re-gathers, as flash attention does).

Why the buffers: on CPU, allocating a fresh multi-MB tensor per block costs more than the
gather itself (page faults), so each call allocates its work buffers once and reuses them
through `out=` variants and in-place ops. Why exp2: torch's vectorised exp2 is ~3x faster
than exp on CPU, so log2(e) is folded into the query scale and the softmax runs in base 2.

Shapes are those of `reference.py`. Math in float32; results cast back to q's dtype.
"""

from __future__ import annotations

import math

import torch

from .layout import unit_stride_rows

_LOG2E = 1.0 / math.log(2.0)
_BUDGET_BYTES = 2 * 2**20  # per-block work buffers: about one core's L2 cache


def _block_size(T: int, H: int, K: int, C: int, backward: bool = False) -> int:
    """Queries per block: as many as keep the block's buffers (gathered rows, scores, and in
    backward the per-row gradient and the probability/gradient pairs) within `_BUDGET_BYTES`.
    Sized to the cache, not to memory: with few heads the batched matmuls are small and bound by
    memory traffic, and a block that spills to L3/DRAM made the backward ~3x slower (measured at
    H=4, K=256, C=80: 48 MB blocks 250-300 ms, 2 MB blocks 80 ms at T=2K)."""
    per_query = 4 * (K * C + H * K) * (2 if backward else 1)
    return int(max(1, min(T, _BUDGET_BYTES // max(1, per_query))))


def _forward(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int):
    B, T, H, C = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    if K == 0 or S == 0:
        return (torch.zeros(B, T, H, dv, dtype=torch.float32, device=q.device),
                torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.empty(B, T, H, dv, dtype=torch.float32, device=q.device)   # every row is written below
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    tb = _block_size(T, H, K, C)
    gathered = torch.empty(tb * K, C, dtype=torch.float32, device=q.device)
    scores = torch.empty(tb, H, K, dtype=torch.float32, device=q.device)
    q_blk = torch.empty(tb, H, C, dtype=torch.float32, device=q.device)
    tiny = torch.finfo(torch.float32).tiny
    for b in range(B):
        kv_b = kv[b]
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            n = t1 - t0
            idx = indices[b, t0:t1]                       # (n, K)
            valid = idx >= 0
            g = gathered[: n * K]
            torch.index_select(kv_b, 0, idx.clamp(min=0).reshape(-1), out=g)
            g = g.view(n, K, C)
            s = scores[:n]
            qb = torch.mul(q[b, t0:t1], scale * _LOG2E, out=q_blk[:n])    # scores in base 2
            torch.bmm(qb, g.transpose(1, 2), out=s)                       # (n, H, K)
            if not bool(valid.all()):                     # only the first queries of a prefill
                s.masked_fill_(~valid[:, None, :], float("-inf"))
            m = s.amax(dim=-1, keepdim=True)
            m.masked_fill_(torch.isinf(m), 0.0)
            s.sub_(m).exp2_()
            denom = s.sum(dim=-1, keepdim=True)           # (n, H, 1)
            o = out[b, t0:t1]
            torch.bmm(s, g[..., :dv], out=o)
            o.div_(denom.clamp(min=tiny))                 # normalise the (H, dv) output, not (H, K) probs
            lse[b, t0:t1] = ((m + denom.log2()) * math.log(2.0)).squeeze(-1)
    return out, lse


def _backward(q, kv, indices, scale, dv, out, lse, dout):
    B, T, H, C = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    dq = torch.zeros(B, T, H, C, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(B, S, C, dtype=torch.float32, device=q.device)
    if K == 0 or S == 0:
        return dq, dkv
    delta = (dout * out).sum(-1)                          # (B, T, H)
    safe_lse = lse.masked_fill(torch.isinf(lse), 0.0)
    # Per query, the 2H rows [q * scale ; dout (zero-padded to C)]: the gradient of the gathered
    # rows is one matmul with [dS ; P], dg = dS^T q + P^T dout, instead of two and a sum.
    lhs = torch.zeros(B, T, 2 * H, C, dtype=torch.float32, device=q.device)
    torch.mul(q, scale, out=lhs[:, :, :H])
    lhs[:, :, H:, :dv] = dout
    tb = _block_size(T, H, K, C, backward=True)
    gathered = torch.empty(tb * K, C, dtype=torch.float32, device=q.device)
    pdp_buf = torch.empty(tb, 2 * H, K, dtype=torch.float32, device=q.device)   # [dS ; P]
    dg_buf = torch.empty(tb, K, C, dtype=torch.float32, device=q.device)
    for b in range(B):
        kv_b = kv[b]
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            n = t1 - t0
            idx = indices[b, t0:t1]
            valid = idx >= 0
            rows = idx.clamp(min=0).reshape(-1)
            g = gathered[: n * K]
            torch.index_select(kv_b, 0, rows, out=g)
            g = g.view(n, K, C)
            qb, dob = lhs[b, t0:t1, :H], dout[b, t0:t1]
            pdp = pdp_buf[:n]
            dp, p = pdp[:, :H], pdp[:, H:]
            torch.bmm(qb, g.transpose(1, 2), out=p)
            p.sub_(safe_lse[b, t0:t1, :, None]).mul_(_LOG2E).exp2_()
            if not bool(valid.all()):
                p.masked_fill_(~valid[:, None, :], 0.0)
            torch.bmm(dob, g[..., :dv].transpose(1, 2), out=dp)       # (n, H, K)
            dp.sub_(delta[b, t0:t1, :, None]).mul_(p)                  # dS / scale
            torch.bmm(dp, g, out=dq[b, t0:t1])                         # (n, H, C)
            dg = dg_buf[:n]
            torch.bmm(pdp.transpose(1, 2), lhs[b, t0:t1], out=dg)      # (n, K, C)
            dkv[b].index_add_(0, rows, dg.view(n * K, C))
    return dq.mul_(scale), dkv


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, scale, dv):
        qf, kvf = q.float().contiguous(), kv.float().contiguous()
        out, lse = _forward(qf, kvf, indices, scale, dv)
        ctx.save_for_backward(qf, kvf, indices, out, lse)
        ctx.scale, ctx.dv, ctx.dtypes = scale, dv, (q.dtype, kv.dtype)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qf, kvf, indices, out, lse = ctx.saved_tensors
        dq, dkv = _backward(qf, kvf, indices, ctx.scale, ctx.dv, out, lse, dout.float().contiguous())
        return dq.to(ctx.dtypes[0]), dkv.to(ctx.dtypes[1]), None, None, None


def sparse_mla_torch(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                     dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked-gather sparse attention; see the module docstring for shapes."""
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return _SparseMLA.apply(q, kv, indices, scale, dv)
    out, lse = _forward(q.float().contiguous(), unit_stride_rows(kv.float()), indices, scale, dv)
    return out.to(q.dtype), lse
