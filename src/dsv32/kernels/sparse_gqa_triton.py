"""Sparse grouped-query attention in Triton: forward and backward. Contract of `sparse_gqa_torch`
(shapes in `torch_gqa.py`): q (B, T, H, d), k (B, S, G, d), v (B, S, G, dv), indices (B, T, K).

Kernels, grid [B*T, G]: one program takes one query and one kv group, i.e. the R = H / G query
heads that read that group (a BLOCK_H >= R tile, padded to a power of two for `tl.dot`), and
walks the K selected slots BLOCK_N at a time. Each gathered K and V row is loaded once and
serves all R heads of its group. Online softmax in base 2.

* `_fwd_kernel` writes out (in q's dtype) and the float32 lse (-inf, out 0, with no valid slot).
* `_bwd_kernel` recomputes probabilities from the saved lse (flash-attention style), owns and
  stores dq once, and accumulates dk/dv rows with float32 `atomic_add` (rows are shared by many
  queries), so dk/dv are not bitwise deterministic run to run (~1 ulp per add); dq and the
  forward are.

Left out: split-K decode (one program per (query, group) already gives B*G programs at T = 1;
the MLA kernel's split-K exists because MLA has a single kv head), FP8, paged caches, tuned
launch configs. Importing needs triton; it registers the ``"triton"`` backend of
`dsv32.kernels.sparse_gqa`. Runs under ``TRITON_INTERPRET=1`` on CPU (float32, float16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register_gqa_backend
from .torch_gqa import check_shapes

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _fwd_kernel(
    Q, Kp, Vp, IDX, O, LSE,
    stride_qt, stride_qh,                       # q as (B*T, H, d)
    stride_kb, stride_ks, stride_kg,            # k as (B, S, G, d)
    stride_vb, stride_vs, stride_vg,            # v as (B, S, G, dv)
    stride_it,                                  # indices as (B*T, K)
    stride_ot, stride_oh,                       # out as (B*T, H, dv)
    stride_lt,                                  # lse as (B*T, H)
    T, NSEL, R, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    b = bt // T
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < R
    heads = g * R + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    q = tl.load(Q + bt * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    k_base = Kp + b * stride_kb + g * stride_kg
    v_base = Vp + b * stride_vb + g * stride_vg
    for n0 in range(0, NSEL, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(IDX + bt * stride_it + offs_n, mask=offs_n < NSEL, other=-1)
        valid = slot >= 0
        slot64 = slot.to(tl.int64)
        k = tl.load(k_base + slot64[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None] & d_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)           # (BLOCK_H, BLOCK_N)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)            # no valid key yet: keep NaN out
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot64[:, None] * stride_vs + offs_v[None, :], mask=valid[:, None] & v_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + bt * stride_ot + heads[:, None] * stride_oh + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=h_ok[:, None] & v_ok[None, :])
    tl.store(LSE + bt * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def _bwd_kernel(
    Q, Kp, Vp, IDX, O, DO, LSE, DQ, DK, DV_,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kg,            # k and dk
    stride_vb, stride_vs, stride_vg,            # v and dv
    stride_it, stride_ot, stride_oh, stride_lt,
    T, NSEL, R, scale, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    b = bt // T
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < R
    heads = g * R + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    hd_ok = h_ok[:, None] & d_ok[None, :]
    hv_ok = h_ok[:, None] & v_ok[None, :]
    q_ptrs = bt * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=hd_ok, other=0.0)
    o_ptrs = bt * stride_ot + heads[:, None] * stride_oh + offs_v[None, :]
    do = tl.load(DO + o_ptrs, mask=hv_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + o_ptrs, mask=hv_ok, other=0.0).to(tl.float32), 1)
    # A query with no slot (lse -inf) and a padding head both get p = exp2(s - inf) = 0.
    lse = tl.load(LSE + bt * stride_lt + heads, mask=h_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_off = b * stride_kb + g * stride_kg
    v_off = b * stride_vb + g * stride_vg
    for n0 in range(0, NSEL, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(IDX + bt * stride_it + offs_n, mask=offs_n < NSEL, other=-1)
        valid = slot >= 0
        slot64 = slot.to(tl.int64)
        nd_ok = valid[:, None] & d_ok[None, :]
        nv_ok = valid[:, None] & v_ok[None, :]
        k_ptrs = k_off + slot64[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_off + slot64[:, None] * stride_vs + offs_v[None, :]
        k = tl.load(Kp + k_ptrs, mask=nd_ok, other=0.0)
        v = tl.load(Vp + v_ptrs, mask=nv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.where(valid[None, :], tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)   # (BLOCK_H, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None]) * scale).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        tl.atomic_add(DK + k_ptrs, tl.dot(tl.trans(ds), q, input_precision=PRECISION), mask=nd_ok)
        tl.atomic_add(DV_ + v_ptrs, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION), mask=nv_ok)
    tl.store(DQ + q_ptrs, dq.to(DQ.dtype.element_ty), mask=hd_ok)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))          # tl.dot tiles: powers of two, at least 16


def _consts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> dict:
    R = q.shape[2] // k.shape[2]
    return dict(D=q.shape[3], DV=v.shape[3], BLOCK_H=_pow2(R), BLOCK_N=16 if backward else 32,
                BLOCK_D=_pow2(q.shape[3]), BLOCK_DV=_pow2(v.shape[3]),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)


def _forward(q, k, v, indices, scale):
    B, T, H, d = q.shape
    G, dv = k.shape[2], v.shape[3]
    out = torch.zeros(B, T, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device)
    if B * T == 0 or indices.shape[-1] == 0:
        return out, lse
    _fwd_kernel[(B * T, G)](
        q, k, v, indices, out, lse, H * d, d, *k.stride()[:3], *v.stride()[:3], indices.stride(1),
        H * dv, dv, H, T, indices.shape[-1], H // G, scale * _LOG2E, **_consts(q, k, v, False))
    return out, lse


def _backward(q, k, v, indices, scale, out, lse, dout):
    B, T, H, d = q.shape
    G, dv = k.shape[2], v.shape[3]
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)      # atomic accumulators
    dvv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if B * T and indices.shape[-1]:
        _bwd_kernel[(B * T, G)](
            q, k, v, indices, out, dout, lse, dq, dk, dvv, H * d, d, *k.stride()[:3], *v.stride()[:3],
            indices.stride(1), H * dv, dv, H, T, indices.shape[-1], H // G, scale, scale * _LOG2E,
            **_consts(q, k, v, True))
    return dq, dk.to(k.dtype), dvv.to(v.dtype)


class _SparseGQATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        out, lse = _forward(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, indices, ctx.scale, out, lse, dout.contiguous())
        return dq, dk, dv, None, None


def sparse_gqa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse GQA attention; shapes in `torch_gqa.py`. Differentiable in q, k and v."""
    check_shapes(q, k, v, indices)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    q, k, v, indices = q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SparseGQATriton.apply(q, k, v, indices, float(scale))
    return _forward(q, k, v, indices, float(scale))


register_gqa_backend("triton", sparse_gqa_triton)

__all__ = ["sparse_gqa_triton"]
