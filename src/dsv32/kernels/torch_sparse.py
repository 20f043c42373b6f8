"""Sparse absorbed-MLA attention in plain torch: gather the selected latent rows per block of
queries (or per query, below) and attend only over them. Cost O(T·K·H·C), memory O(T·H·C + block·K·C); no T×S
tensor is ever built. Forward and backward are a custom autograd Function that saves only
the inputs, the output and the log-sum-exp (the backward re-gathers, as flash attention does).

Why the buffers: on CPU, allocating a fresh multi-MB tensor per block costs more than the
gather itself (page faults), so each call allocates its work buffers once and reuses them
through `out=` variants and in-place ops. Why exp2: torch's vectorised exp2 is ~3x faster
than exp on CPU, so log2(e) is folded into the query scale and the softmax runs in base 2.

Two forward paths, chosen per call by `_forward`:
* blocked (`_forward_blocked`): a block of queries per pair of batched matmuls (torch's CPU
  matmul, i.e. MKL's sgemm). Kept for few heads, where one query's products are too small to
  pay for a call each, and for other devices.
* per query (`_forward_per_query`): one query's two products at a time on oneDNN, for many
  heads on CPU (H x K >= `_PER_QUERY_MIN_HK`). MKL runs its AVX2 code on AMD processors: on
  the Zen 5 core this was measured on, a 2048^3 fp32 matmul is ~85-93 GFLOP/s through torch.mm
  and ~190 through oneDNN (which uses AVX-512 there). oneDNN is reached through the op torch's
  own CPU compiler calls, `torch.ops.mkldnn._linear_pointwise` (X W^T, W laid out afresh by
  oneDNN on every call; see `onednn.py`): the scores are q g^T; the output P g is P (g^T)^T with g^T passed as
  a transposed view, which that layout pass absorbs. It computes all C columns, the d_r rope
  columns being ~12% extra work: less than copying the first dv columns out (measured at
  H=128, k=2048: 1.41 ms, against 1.48 with the copy and 1.95 for a 1x1 convolution). Each row attends over its valid slots (not -1) rounded up to a
  multiple of `_PAD_BUCKET` (the extra slots masked): the first queries of a prefill do about
  the work they need, and oneDNN, which compiles a kernel per shape (~3 ms a pair at H=128),
  sees a few shapes, not one per row length (or per decode step while the cache is shorter
  than top-k).

Shapes are those of `reference.py`. Math in float32; results cast back to q's dtype.
"""

from __future__ import annotations

import math

import torch

from .layout import unit_stride_rows
from .onednn import onednn_op as _onednn_inner

_LOG2E = 1.0 / math.log(2.0)
_BUDGET_BYTES = 2 * 2**20  # per-block work buffers: about one core's L2 cache
# H * K from which the per-query oneDNN path is faster than blocks on MKL (fp32, C=576, dv=512,
# per-query / blocked time at one thread: H=16 K=512 1.3; H=16 K=2048 0.86; H=64 K=512 0.73;
# H=128 K=512 and 2048 0.67; at two threads: H=16 K=2048 0.96, H=64 K=512 0.81, H=128 0.65).
_PER_QUERY_MIN_HK = 32768
_PAD_BUCKET = 128


def _block_size(T: int, H: int, K: int, C: int, backward: bool = False) -> int:
    """Queries per block: as many as keep the block's buffers (gathered rows, scores, and in
    backward the per-row gradient and the probability/gradient pairs) within `_BUDGET_BYTES`.
    Sized to the cache, not to memory: with few heads the batched matmuls are small and bound by
    memory traffic, and a block that spills to L3/DRAM made the backward ~3x slower (measured at
    H=4, K=256, C=80: 48 MB blocks 250-300 ms, 2 MB blocks 80 ms at T=2K)."""
    per_query = 4 * (K * C + H * K) * (2 if backward else 1)
    return int(max(1, min(T, _BUDGET_BYTES // max(1, per_query))))


def _choose_path(q: torch.Tensor, K: int) -> str:
    H = q.shape[2]
    if (q.device.type == "cpu" and H * K >= _PER_QUERY_MIN_HK and torch.backends.mkldnn.enabled
            and _onednn_inner() is not None):
        return "per_query"
    return "blocked"


def _forward(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
             path: str | None = None):
    """float32 q (B, T, H, C), kv (B, S, C) with unit-stride rows -> (out, lse). `path`:
    "blocked" or "per_query" (tests pin it); None chooses by `_choose_path`."""
    B, T, H, C = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    if K == 0 or S == 0:
        return (torch.zeros(B, T, H, dv, dtype=torch.float32, device=q.device),
                torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device))
    path = path or _choose_path(q, K)
    if path == "per_query":
        return _forward_per_query(q, kv, indices, scale, dv)
    if path != "blocked":
        raise ValueError(f"unknown sparse forward path {path!r}; expected 'blocked' or 'per_query'")
    return _forward_blocked(q, kv, indices, scale, dv)


def _forward_per_query(q, kv, indices, scale, dv):
    inner = _onednn_inner()
    B, T, H, C = q.shape
    K = indices.shape[-1]
    out = torch.empty(B, T, H, dv, dtype=torch.float32)
    lse = torch.empty(B, T, H, dtype=torch.float32)   # base 2 until the end
    K_max = -(-K // _PAD_BUCKET) * _PAD_BUCKET
    g_buf = torch.empty(K_max, C, dtype=torch.float32)  # gathered rows
    rows_buf = torch.empty(K_max, dtype=indices.dtype)
    q_t = torch.empty(H, C, dtype=torch.float32)
    m, denom = torch.empty(H, 1, dtype=torch.float32), torch.empty(H, 1, dtype=torch.float32)
    padded = (indices.amin(dim=-1) < 0).tolist()        # (B, T): rows with any -1 slot
    for b in range(B):
        kv_b = kv[b]
        for t in range(T):
            idx = indices[b, t]
            valid = idx[idx >= 0] if padded[b][t] else idx
            n_valid = valid.numel()
            if n_valid == 0:
                out[b, t] = 0.0
                lse[b, t] = float("-inf")
                continue
            k = -(-n_valid // _PAD_BUCKET) * _PAD_BUCKET
            if k != K or padded[b][t]:
                idx = rows_buf[:k]
                idx[:n_valid] = valid
                idx[n_valid:] = 0                                        # any row; masked below
            g = g_buf[:k]
            torch.index_select(kv_b, 0, idx, out=g)
            torch.mul(q[b, t], scale * _LOG2E, out=q_t)                  # scores in base 2
            s = inner(q_t, g, None, "none", [], "")                      # (H, k) = q_t g^T
            if n_valid < k:
                s[:, n_valid:] = float("-inf")
            torch.amax(s, dim=-1, keepdim=True, out=m)
            s.sub_(m).exp2_()
            torch.sum(s, dim=-1, keepdim=True, out=denom)
            o = inner(s, g.t(), None, "none", [], "")                    # (H, C) = P g
            torch.div(o[:, :dv], denom, out=out[b, t])                   # normalise the output, not P
            torch.log2(denom, out=lse[b, t].unsqueeze(-1)).add_(m)
    return out, lse.mul_(math.log(2.0))


def _forward_blocked(q, kv, indices, scale, dv):
    B, T, H, C = q.shape
    K = indices.shape[-1]
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
