"""Sparse grouped-query attention: every query attends only to its selected key slots, the
retrofit of DSA onto a dense GQA model (docs/math.md §4b). One dispatch, the backends of
`sparse_mla`:

    sparse_gqa(q, k, v, indices, scale, backend="auto") -> (out, lse)

    q        (B, T, H, d)     queries, head h reads kv group h // R  (R = H / G)
    k        (B, S, G, dk)    keys (dk = d)          v (B, S, G, dv) values
    indices  (B, T, K)        selected key slots per query (shared by all heads), -1 = empty
    out      (B, T, H, dv)    in q's dtype;  lse (B, T, H) float32, -inf (and out 0) with no slot

* ``"reference"`` — dense masked attention over the T×S mask built from `indices` (tests only);
* ``"torch"``     — blocks of queries: gather the K selected rows of every group once, and let
  each gathered row serve the R query heads of its group (a (R, K) score tile per group), no
  T×S tensor; a custom autograd Function that saves only inputs, output and lse and re-gathers
  in the backward (flash-attention style);
* ``"triton"``    — `sparse_gqa_triton.py`, registered when first needed on CUDA.

Slots must be distinct within a query and < S (not range-checked: that would sync the host).
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import indices_to_mask, masked_attention

GQABackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                      tuple[torch.Tensor, torch.Tensor]]
_BUDGET_BYTES = 32 * 2**20   # gathered K and V rows per block of queries (float32)


def sparse_gqa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention with each group's K/V repeated for its R heads (float32 math)."""
    R = q.shape[2] // k.shape[2]
    mask = indices_to_mask(indices, k.shape[1])
    out, lse = masked_attention(q, k.repeat_interleave(R, dim=2), v.repeat_interleave(R, dim=2), mask, scale)
    return out.to(q.dtype), lse


def _block(T: int, K: int, G: int, d: int, dv: int) -> int:
    return int(max(1, min(T, _BUDGET_BYTES // max(1, 4 * K * G * (d + dv)))))


def _gather(x_b: torch.Tensor, rows: torch.Tensor, n: int, K: int) -> torch.Tensor:
    """x_b (S, G, c), rows (n*K,) -> (n*G, K, c): the selected rows, grouped by kv group."""
    G, c = x_b.shape[1], x_b.shape[2]
    return x_b.index_select(0, rows).view(n, K, G, c).permute(0, 2, 1, 3).reshape(n * G, K, c)


def _forward(q, k, v, indices, scale):
    B, T, H, d = q.shape
    S, G, dv = k.shape[1], k.shape[2], v.shape[3]
    K, R = indices.shape[-1], H // G
    out = torch.zeros(B, T, H, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device)
    if K == 0 or S == 0:
        return out, lse
    tb = _block(T, K, G, d, dv)
    for b in range(B):
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            n = t1 - t0
            idx = indices[b, t0:t1]                                       # (n, K)
            rows = idx.clamp(min=0).reshape(-1)
            gk, gv = _gather(k[b], rows, n, K), _gather(v[b], rows, n, K)  # (n*G, K, d|dv)
            qb = q[b, t0:t1].reshape(n * G, R, d)
            s = torch.bmm(qb, gk.transpose(1, 2)) * scale                  # (n*G, R, K)
            invalid = (idx < 0).repeat_interleave(G, dim=0)[:, None, :]   # (n*G, 1, K)
            s = s.masked_fill(invalid, float("-inf"))
            m = s.amax(-1, keepdim=True)
            m = m.masked_fill(torch.isinf(m), 0.0)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            o = torch.bmm(p, gv) / denom.clamp(min=torch.finfo(torch.float32).tiny)
            out[b, t0:t1] = o.view(n, H, dv)
            lse[b, t0:t1] = torch.where(denom > 0, m + denom.log(), float("-inf")).view(n, H)
    return out, lse


def _backward(q, k, v, indices, scale, out, lse, dout):
    B, T, H, d = q.shape
    S, G, dv = k.shape[1], k.shape[2], v.shape[3]
    K, R = indices.shape[-1], H // G
    dq, dk, dv_ = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if K == 0 or S == 0:
        return dq, dk, dv_
    delta = (dout * out).sum(-1)                                         # (B, T, H)
    safe_lse = lse.masked_fill(torch.isinf(lse), float("inf"))           # p = 0 for a query with no slot
    tb = _block(T, K, G, d, dv)
    for b in range(B):
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            n = t1 - t0
            idx = indices[b, t0:t1]
            rows = idx.clamp(min=0).reshape(-1)
            gk, gv = _gather(k[b], rows, n, K), _gather(v[b], rows, n, K)
            qb = q[b, t0:t1].reshape(n * G, R, d)
            dob = dout[b, t0:t1].reshape(n * G, R, dv)
            p = torch.exp(torch.bmm(qb, gk.transpose(1, 2)) * scale - safe_lse[b, t0:t1].reshape(n * G, R, 1))
            p = p.masked_fill((idx < 0).repeat_interleave(G, dim=0)[:, None, :], 0.0)
            dp = torch.bmm(dob, gv.transpose(1, 2))                       # (n*G, R, K)
            ds = p * (dp - delta[b, t0:t1].reshape(n * G, R, 1)) * scale
            dq[b, t0:t1] = torch.bmm(ds, gk).view(n, H, d)
            dgk = torch.bmm(ds.transpose(1, 2), qb)                       # (n*G, K, d)
            dgv = torch.bmm(p.transpose(1, 2), dob)                       # (n*G, K, dv)
            for grad, dest, c in ((dgk, dk, d), (dgv, dv_, dv)):
                rows_g = grad.view(n, G, K, c).permute(0, 2, 1, 3).reshape(n * K, G, c)
                dest[b].index_add_(0, rows, rows_g)
    return dq, dk, dv_


class _SparseGQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        qf, kf, vf = q.float().contiguous(), k.float().contiguous(), v.float().contiguous()
        out, lse = _forward(qf, kf, vf, indices, scale)
        ctx.save_for_backward(qf, kf, vf, indices, out, lse)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qf, kf, vf, indices, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(qf, kf, vf, indices, ctx.scale, out, lse, dout.float().contiguous())
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None, None


def sparse_gqa_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked-gather sparse GQA; shapes in the module docstring. Differentiable in q, k, v."""
    check_shapes(q, k, v, indices)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SparseGQA.apply(q, k, v, indices, float(scale))
    out, lse = _forward(q.float(), k.float(), v.float(), indices, float(scale))
    return out.to(q.dtype), lse


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or indices.dim() != 3:
        raise ValueError(f"expected q (B,T,H,d), k (B,S,G,d), v (B,S,G,dv), indices (B,T,K); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, indices {tuple(indices.shape)}")
    B, T, H, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or v.shape[:3] != k.shape[:3] or indices.shape[:2] != (B, T):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"indices {tuple(indices.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"query heads H={H} must be a multiple of kv groups G={k.shape[2]}")

