"""Sparse absorbed-MLA attention in Triton: forward, backward, and split-K decode.

Same contract as `sparse_mla_torch` (shapes in `reference.py`):

    q        (B, T, H, C)    C = r_kv + d_r, the absorbed query [W_uk^T q_n ; q_r]
    kv       (B, S, C)       the latent rows [c_kv ; k_r], ONE head shared by all query heads
    indices  (B, T, K)       selected key slots per query (int32 or int64), -1 = empty slot
    out      (B, T, H, Dv)   attention-weighted sum of kv[..., :Dv], in q's dtype
    lse      (B, T, H)       float32 log-sum-exp of the scaled scores; -inf (and out 0) for a
                             query with no valid slot

Kernels (grid axes in brackets):

* `_fwd_kernel` [B*T, H tiles, splits] — one program takes one query and a tile of BLOCK_H
  heads and walks its K selected slots BLOCK_N at a time. Each gathered latent row is loaded
  once and used by every head of the tile, for both the score (q·kv) and the output (p·kv[:Dv]):
  that sharing is the point of the absorbed (MQA) form. Online softmax in base 2. A row is split
  into its value part [0, Dv) and its tail [Dv, C) (the RoPE dims) so both fit power-of-two
  tiles without padding the real shape (512 + 64). At H = 128 the tile is 64 heads, so the two
  tiles of a query each gather its rows (the second mostly from L2): one 128-head tile would
  need a 128 x 512 float32 accumulator, 256 KB: an H100 multiprocessor's whole register file.
* `_combine_kernel` [B*T, H tiles] — decode: when B*T*tiles is too small to fill the GPU
  (T = 1), the K slots are cut into splits, each writes a normalised partial output and its
  lse, and this kernel merges them by their softmax weights.
* `_bwd_kernel` [B*T, H tiles] — flash-attention style backward: probabilities are recomputed
  from the saved lse; delta = rowsum(dout * out) is computed in-kernel. dq is owned by the
  program and stored once. dkv rows are shared by many queries (and by the H tiles of one
  query), so they are accumulated with float32 `atomic_add` into a float32 buffer: dkv is
  therefore NOT bitwise deterministic (summation order varies run to run, ~1 ulp of float32
  per add); dq and the forward are deterministic. Materialising the per-(t, slot)
  contributions for a fixed-order sum is out (B*T*K*C floats: 300 GB at T=64K, K=2048); if
  determinism is ever required, the way is to sort the B*T*K (slot, t) pairs by slot and let
  one program own each dkv row.

Left out: FP8 inputs, paged caches (the cache is one dense (B, S, C) tensor), tuned launch
configurations (the block sizes below are chosen from the tile shapes, not autotuned), and
duplicate slots within one query's indices (each copy counts, as in
`sparse_mla_torch`; the masked reference counts a slot once). Slots must be < S; they are not
range-checked (that would cost a host sync).

Importing this module needs triton; it registers the ``"triton"`` backend of
`dsv32.kernels.sparse_mla`. It also runs under ``TRITON_INTERPRET=1`` on CPU (float32 and
float16; the interpreter mishandles bfloat16), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register_backend
from .layout import unit_stride_rows

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(
    Q, KV, IDX, O, LSE,
    stride_qt, stride_qh,                 # q as (B*T, H, C)
    stride_kb, stride_ks,                 # kv as (B, S, C)
    stride_it,                            # indices as (B*T, K)
    stride_ot, stride_osp, stride_oh,     # out as (B*T, splits, H, Dv)
    stride_lt, stride_lsp,                # lse as (B*T, splits, H)
    T, H, K, k_per_split, scale_log2,
    C: tl.constexpr, DV: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)   # int64: B*T*H*C overflows int32 at V3.2 sizes
    b = bt // T
    split = tl.program_id(2)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    q_rows = Q + bt * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_rows + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)
    if HAS_TAIL:
        offs_t = DV + tl.arange(0, BLOCK_DT)
        t_ok = offs_t < C
        q_t = tl.load(q_rows + offs_t[None, :], mask=h_ok[:, None] & t_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max, log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    kv_b = KV + b * stride_kb
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(IDX + bt * stride_it + offs_n, mask=offs_n < k_hi, other=-1)
        valid = slot >= 0
        rows = kv_b + slot.to(tl.int64)[:, None] * stride_ks       # -1 rows are never loaded
        k_v = tl.load(rows + offs_v[None, :], mask=valid[:, None] & v_ok[None, :], other=0.0)
        s = tl.dot(q_v, tl.trans(k_v), input_precision=PRECISION)  # (BLOCK_H, BLOCK_N)
        if HAS_TAIL:
            k_t = tl.load(rows + offs_t[None, :], mask=valid[:, None] & t_ok[None, :], other=0.0)
            s += tl.dot(q_t, tl.trans(k_t), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Until a head has seen a valid key its max is -inf; shifting by 0 instead keeps
        # exp2(-inf - -inf) = NaN out of alpha and p.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_v.dtype), k_v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = O + bt * stride_ot + split * stride_osp + offs_h[:, None] * stride_oh + offs_v[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=h_ok[:, None] & v_ok[None, :])
    tl.store(LSE + bt * stride_lt + split * stride_lsp + offs_h, lse, mask=h_ok)


@triton.jit
def _combine_kernel(
    OP, LP, O, LSE,
    stride_pt, stride_psp, stride_ph,     # partial out (B*T, splits, H, Dv) float32
    stride_lpt, stride_lpsp,              # partial lse (B*T, splits, H)
    stride_ot, stride_oh,                 # out (B*T, H, Dv)
    stride_lt,                            # lse (B*T, H)
    H, num_splits,
    DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_v = tl.arange(0, BLOCK_DV)
    ok = h_ok[:, None] & (offs_v < DV)[None, :]
    lp = LP + bt * stride_lpt + offs_h
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for sp in range(num_splits):
        m = tl.maximum(m, tl.load(lp + sp * stride_lpsp, mask=h_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    op = OP + bt * stride_pt + offs_h[:, None] * stride_ph + offs_v[None, :]
    for sp in range(num_splits):
        wgt = tl.exp(tl.load(lp + sp * stride_lpsp, mask=h_ok, other=float("-inf")) - m_use)
        denom += wgt
        acc += wgt[:, None] * tl.load(op + sp * stride_psp, mask=ok, other=0.0)
    seen = denom > 0.0
    out = acc / tl.where(seen, denom, 1.0)[:, None]
    lse = tl.where(seen, m_use + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
    tl.store(O + bt * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
             out.to(O.dtype.element_ty), mask=ok)
    tl.store(LSE + bt * stride_lt + offs_h, lse, mask=h_ok)


@triton.jit
def _bwd_kernel(
    Q, KV, IDX, O, DO, LSE, DQ, DKV,
    stride_qt, stride_qh,                 # q and dq as (B*T, H, C)
    stride_kb, stride_ks,                 # kv and dkv as (B, S, C)
    stride_it,                            # indices as (B*T, K)
    stride_ot, stride_oh,                 # out and dout as (B*T, H, Dv)
    stride_lt,                            # lse as (B*T, H)
    T, H, K, scale, scale_log2,
    C: tl.constexpr, DV: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    hv_ok = h_ok[:, None] & v_ok[None, :]
    q_rows = Q + bt * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_rows + offs_v[None, :], mask=hv_ok, other=0.0)
    if HAS_TAIL:
        offs_t = DV + tl.arange(0, BLOCK_DT)
        t_ok = offs_t < C
        q_t = tl.load(q_rows + offs_t[None, :], mask=h_ok[:, None] & t_ok[None, :], other=0.0)
        dq_t = tl.zeros([BLOCK_H, BLOCK_DT], tl.float32)
    o_rows = bt * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :]
    do = tl.load(DO + o_rows, mask=hv_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + o_rows, mask=hv_ok, other=0.0).to(tl.float32), 1)
    # A query with no key (lse -inf) and a padding head both get p = exp2(s - inf) = 0.
    lse = tl.load(LSE + bt * stride_lt + offs_h, mask=h_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    dq_v = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)

    kv_b = KV + b * stride_kb
    dkv_b = DKV + b * stride_kb
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(IDX + bt * stride_it + offs_n, mask=offs_n < K, other=-1)
        valid = slot >= 0
        row_off = slot.to(tl.int64)[:, None] * stride_ks
        nv_ok = valid[:, None] & v_ok[None, :]
        k_v = tl.load(kv_b + row_off + offs_v[None, :], mask=nv_ok, other=0.0)
        s = tl.dot(q_v, tl.trans(k_v), input_precision=PRECISION)
        if HAS_TAIL:
            nt_ok = valid[:, None] & t_ok[None, :]
            k_t = tl.load(kv_b + row_off + offs_t[None, :], mask=nt_ok, other=0.0)
            s += tl.dot(q_t, tl.trans(k_t), input_precision=PRECISION)
        p = tl.where(valid[None, :], tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)   # (BLOCK_H, BLOCK_N)
        dp = tl.dot(do, tl.trans(k_v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None]) * scale).to(k_v.dtype)
        dq_v += tl.dot(ds, k_v, input_precision=PRECISION)
        dk_v = tl.dot(tl.trans(ds), q_v, input_precision=PRECISION)
        dk_v += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        tl.atomic_add(dkv_b + row_off + offs_v[None, :], dk_v, mask=nv_ok)
        if HAS_TAIL:
            dq_t += tl.dot(ds, k_t, input_precision=PRECISION)
            dk_t = tl.dot(tl.trans(ds), q_t, input_precision=PRECISION)
            tl.atomic_add(dkv_b + row_off + offs_t[None, :], dk_t, mask=nt_ok)

    dq_rows = DQ + bt * stride_qt + offs_h[:, None] * stride_qh
    tl.store(dq_rows + offs_v[None, :], dq_v.to(DQ.dtype.element_ty), mask=hv_ok)
    if HAS_TAIL:
        tl.store(dq_rows + offs_t[None, :], dq_t.to(DQ.dtype.element_ty), mask=h_ok[:, None] & t_ok[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _pow2(n: int, floor: int = 16) -> int:
    # tl.dot needs every tile dimension to be a power of two and at least 16.
    return max(floor, triton.next_power_of_2(n))


class _Shape:
    """Tile sizes and launch options for one call (heuristics, not measured on a GPU)."""

    def __init__(self, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, dv: int,
                 backward: bool = False) -> None:
        self.B, self.T, self.H, self.C = q.shape
        self.S, self.K = kv.shape[1], indices.shape[-1]
        self.dv = dv
        self.block_dv = _pow2(dv)
        self.has_tail = self.C > dv
        self.block_dt = _pow2(self.C - dv) if self.has_tail else 16
        # Budget at Dv = 512 (bf16, 8 warps): the forward keeps q (64 x 576, 72 KB) and two
        # stages of gathered rows (2 x 32 x 576, 72 KB) in shared memory and the 64 x 512 fp32
        # accumulator in registers (128 per thread). The backward also holds dout and dq, so it
        # halves the head tile (twice the dkv atomics, but it fits) and gathers 16 rows at a time.
        wide = self.block_dv >= 256
        self.block_h = min(32 if (backward and wide) else 64, _pow2(self.H))
        self.block_n = 16 if backward else 32
        self.num_stages = 1 if backward else 2
        self.num_warps = 8 if wide else 4
        self.h_tiles = triton.cdiv(self.H, self.block_h)
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def constexprs(self) -> dict:
        return dict(C=self.C, DV=self.dv, HAS_TAIL=self.has_tail, BLOCK_H=self.block_h,
                    BLOCK_N=self.block_n, BLOCK_DV=self.block_dv, BLOCK_DT=self.block_dt,
                    PRECISION=self.precision, num_warps=self.num_warps, num_stages=self.num_stages)


def _auto_splits(shape: _Shape, device: torch.device) -> int:
    """Split K only when the (query, head tile) programs cannot fill the GPU (decode), and keep
    at least four blocks of slots per split so the combine stays cheap."""
    if device.type != "cuda":
        return 1
    programs = shape.B * shape.T * shape.h_tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), shape.K // (4 * shape.block_n)))


def _check(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, dv: int) -> None:
    if q.dim() != 4 or kv.dim() != 3 or indices.dim() != 3:
        raise ValueError(f"expected q (B,T,H,C), kv (B,S,C), indices (B,T,K); got q {tuple(q.shape)}, "
                         f"kv {tuple(kv.shape)}, indices {tuple(indices.shape)}")
    B, T, H, C = q.shape
    if kv.shape[0] != B or kv.shape[2] != C or indices.shape[:2] != (B, T):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, kv {tuple(kv.shape)}, "
                         f"indices {tuple(indices.shape)} (need kv (B,S,C) and indices (B,T,K))")
    if not 0 < dv <= C:
        raise ValueError(f"dv must be in [1, C={C}], got {dv}")
    if q.dtype not in _DTYPES or kv.dtype != q.dtype:
        raise ValueError(f"q and kv must share one dtype of {_DTYPES}; got {q.dtype}, {kv.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if not (q.device == kv.device == indices.device):
        raise ValueError(f"q, kv, indices on different devices: {q.device}, {kv.device}, {indices.device}")


def _forward(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
             num_splits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous inputs -> out (B, T, H, dv) in q.dtype, lse (B, T, H) float32."""
    sh = _Shape(q, kv, indices, dv)
    B, T, H = sh.B, sh.T, sh.H
    out = torch.empty(B, T, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    if B * T * H == 0:
        return out, lse
    splits = _auto_splits(sh, q.device) if num_splits is None else num_splits
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    # Each split's slot range is a whole number of blocks; trailing empty splits are dropped.
    k_per_split = triton.cdiv(max(1, triton.cdiv(sh.K, splits)), sh.block_n) * sh.block_n
    splits = max(1, triton.cdiv(sh.K, k_per_split))
    if splits == 1:
        o_buf, l_buf = out.view(B * T, 1, H, dv), lse.view(B * T, 1, H)
    else:
        o_buf = torch.empty(B * T, splits, H, dv, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(B * T, splits, H, dtype=torch.float32, device=q.device)
    _fwd_kernel[(B * T, sh.h_tiles, splits)](
        q, kv, indices, o_buf, l_buf,
        H * sh.C, sh.C, kv.stride(0), kv.stride(1), indices.stride(1),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        T, H, sh.K, k_per_split, scale * _LOG2E, **sh.constexprs())
    if splits > 1:
        _combine_kernel[(B * T, sh.h_tiles)](
            o_buf, l_buf, out, lse,
            o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
            H * dv, dv, H, H, splits,
            DV=dv, BLOCK_H=sh.block_h, BLOCK_DV=sh.block_dv, num_warps=sh.num_warps)
    return out, lse


def _backward(q, kv, indices, scale, dv, out, lse, dout):
    sh = _Shape(q, kv, indices, dv, backward=True)
    B, T, H = sh.B, sh.T, sh.H
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)   # atomic accumulator
    if B * T * H == 0:
        return dq.zero_(), dkv.to(kv.dtype)
    _bwd_kernel[(B * T, sh.h_tiles)](
        q, kv, indices, out, dout, lse, dq, dkv,
        H * sh.C, sh.C, kv.stride(0), kv.stride(1), indices.stride(1), H * dv, dv, H,
        T, H, sh.K, scale, scale * _LOG2E, **sh.constexprs())
    return dq, dkv.to(kv.dtype)


class _SparseMLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, scale, dv, num_splits):
        out, lse = _forward(q, kv, indices, scale, dv, num_splits)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.scale, ctx.dv = scale, dv
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, indices, out, lse = ctx.saved_tensors
        dq, dkv = _backward(q, kv, indices, ctx.scale, ctx.dv, out, lse, dout.contiguous())
        return dq, dkv, None, None, None, None


def sparse_mla_triton(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
                      num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention; see the module docstring for shapes. Differentiable in q
    and kv. `num_splits` cuts the K slots into that many split-K partitions merged by
    `_combine_kernel`; None chooses (more than one only for decode-sized launches on CUDA)."""
    _check(q, kv, indices, dv)
    q, indices = q.contiguous(), indices.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return _SparseMLATriton.apply(q, kv.contiguous(), indices, float(scale), dv, num_splits)
    return _forward(q, unit_stride_rows(kv), indices, float(scale), dv, num_splits)


register_backend("triton", sparse_mla_triton)

__all__ = ["sparse_mla_triton"]
