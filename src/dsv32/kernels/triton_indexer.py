"""The lightning indexer's scores fused with a two-stage top-k selection, in Triton (docs/math.md §4-5).

    q          (B, T, H_I, d_I)  indexer queries (float16, bfloat16 or float32)
    w          (B, T, H_I)       float32 head weights, every scale already folded in
    k          (B, S, d_I)       indexer keys, ONE head shared by all query heads; q's dtype
    key_valid  (B, S) bool       False at padding slots (optional)
    I(t, s)  = sum_j w(t, j) * ReLU(q(t, j) . k(s))
    allowed  = s <= q_start + t (causal by slot) and key_valid[b, s]
    out        (B, T, min(topk, S)) int64 slots, best first; -1 where fewer keys are allowed

Semantics, including the selection order (score descending, then key slot ascending; -0.0 as
0.0), are those of `torch_indexer.select_topk_torch`: the same scores give the same set.

Stage 1, `_score_kernel` [B * query tiles, key blocks]: a program scores BLOCK_T queries
against BLOCK_S keys. Its (query, head) pairs form the rows of ONE matrix product with the key
block — BLOCK_T * H_I rows, so even decode (T = 1, H_I = 64) feeds the tensor cores a 64-row
tile — then ReLU, the head weights and a sum over heads give (BLOCK_T, BLOCK_S) scores,
masked to -inf where not allowed. Blocks wholly after every query of the tile are not scored.
When topk < BLOCK_S the program keeps only its block's top-KEEP (KEEP = next power of two >=
topk) per query, as (score, slot) packed into one int64 in the order's encoding
(`torch_indexer.order_codes`), so a single `tl.topk` sorts both and the block's survivors are
its first KEEP keys in the selection order (so the global top-k in that order survives);
otherwise every score is kept (nothing can be pruned exactly: the whole top-k may sit in one
block). Stage 2, the merge: `torch.topk` over each query's candidates, encoded the same way (a
radix select on CUDA).

At the V3.2 shape (topk = 2048 > BLOCK_S) stage 1 therefore writes every causal score of a
chunk of queries and stage 2 does the selection; the candidate buffer is bounded by processing
queries in chunks (`_CANDIDATE_BUDGET_BYTES`). A single-pass fused top-k of 2048 per query
would need the running top-2048 of many queries on chip, which does not fit.

Left out: the forced window/sink slots of the optional extension (delegated to the torch
path), FP8 inputs (fp8=True numerics are applied by the caller before this is reached), and
gradients (selection is not differentiable). Block sizes are reasoned, not measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register_selector
from .layout import unit_stride_rows
from .torch_indexer import order_codes, select_topk_torch, topk_ordered

_CANDIDATE_BUDGET_BYTES = 512 * 2**20   # stage-1 output of one chunk of queries
_BLOCK_S = 64
_ROWS = 128                              # (query, head) rows per program in prefill


@triton.jit
def _score_kernel(
    Q, W, KI, VALID, VAL, SLOT,
    stride_qb, stride_qt, stride_qh,      # q (B, T, H_I, d_I), last dim contiguous
    stride_wb, stride_wt,                 # w (B, T, H_I)
    stride_kb, stride_ks,                 # k (B, S, d_I)
    stride_vb,                            # key_valid (B, S) as uint8
    stride_cb, stride_ct,                 # candidates (B, T, n_blocks * KEEP)
    T, S, q_slot0, H_I, q_tiles,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, KEEP: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // q_tiles).to(tl.int64)
    t0 = (pid % q_tiles) * BLOCK_T
    kb = tl.program_id(1)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_s = kb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    allowed = (offs_s[None, :] <= (q_slot0 + offs_t)[:, None]) & s_ok[None, :] & t_ok[:, None]
    if HAS_VALID:
        real = tl.load(VALID + b * stride_vb + offs_s, mask=s_ok, other=0) != 0
        allowed = allowed & real[None, :]

    scores = tl.full([BLOCK_T, BLOCK_S], float("-inf"), tl.float32)
    if kb * BLOCK_S <= q_slot0 + tl.minimum(t0 + BLOCK_T, T) - 1:
        rows = tl.arange(0, BLOCK_T * BLOCK_HI)          # row = query * BLOCK_HI + head
        r_t = t0 + rows // BLOCK_HI
        r_j = rows % BLOCK_HI
        r_ok = (r_t < T) & (r_j < H_I)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(Q + b * stride_qb + r_t[:, None].to(tl.int64) * stride_qt + r_j[:, None] * stride_qh
                    + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        wr = tl.load(W + b * stride_wb + r_t.to(tl.int64) * stride_wt + r_j, mask=r_ok, other=0.0)
        k = tl.load(KI + b * stride_kb + offs_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)        # (rows, BLOCK_S)
        logits = tl.maximum(logits, 0.0) * wr[:, None]
        per_query = tl.sum(tl.reshape(logits, (BLOCK_T, BLOCK_HI, BLOCK_S)), axis=1)
        scores = tl.where(allowed, per_query, float("-inf"))
        scores = tl.where(scores == 0.0, 0.0, scores)        # -0.0 ranks as 0.0 (one zero)

    c_rows = b * stride_cb + offs_t[:, None].to(tl.int64) * stride_ct
    if KEEP < BLOCK_S:
        # `order_codes`: order-preserving int32 image of the float (flip the magnitude bits of
        # negatives) in the high word, 2^31-1-slot in the low word, so equal scores rank the
        # lower slot first and the slot rides along through the sort.
        bits = scores.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        packed = (key.to(tl.int64) << 32) | (0x7FFFFFFF - offs_s[None, :]).to(tl.int64)
        top = tl.topk(packed, KEEP, dim=1)                                   # (BLOCK_T, KEEP)
        top_key = (top >> 32).to(tl.int32)
        top_val = (top_key ^ ((top_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        offs_c = kb * KEEP + tl.arange(0, KEEP)
        tl.store(VAL + c_rows + offs_c[None, :], top_val, mask=t_ok[:, None])
        tl.store(SLOT + c_rows + offs_c[None, :], (0x7FFFFFFF - (top & 0xFFFFFFFF)).to(tl.int32),
                 mask=t_ok[:, None])
    else:
        tl.store(VAL + c_rows + offs_s[None, :], scores, mask=t_ok[:, None])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _candidates(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int,
                valid_u8: torch.Tensor | None, block_s: int = _BLOCK_S
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage 1 for one chunk of queries (slots q_start..q_start+T-1) over keys k[:, :S].
    Returns candidate scores (B, T, n_blocks * keep) float32 (-inf = not allowed) and their
    slots (same shape, int32), or None for the slots when nothing is pruned (then the column is
    the slot)."""
    B, T, Hi, d = q.shape
    S = k.shape[1]
    keep = min(_pow2(topk), block_s)
    block_hi = _pow2(Hi)
    # At least 16 rows for tl.dot; in prefill about _ROWS rows so the key block is reused.
    block_t = max(max(1, 16 // block_hi), min(_pow2(T), max(1, _ROWS // block_hi)))
    q_tiles = triton.cdiv(T, block_t)
    n_blocks = triton.cdiv(S, block_s)
    vals = torch.empty(B, T, n_blocks * keep, dtype=torch.float32, device=q.device)
    slots = torch.empty(vals.shape, dtype=torch.int32, device=q.device) if keep < block_s else None
    _score_kernel[(B * q_tiles, n_blocks)](
        q, w, k, valid_u8 if valid_u8 is not None else k, vals, slots if slots is not None else vals,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        valid_u8.stride(0) if valid_u8 is not None else 0, vals.stride(0), vals.stride(1),
        T, S, q_start, Hi, q_tiles,
        D=d, BLOCK_T=block_t, BLOCK_HI=block_hi, BLOCK_D=max(16, _pow2(d)), BLOCK_S=block_s,
        KEEP=keep, HAS_VALID=valid_u8 is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4)
    return vals, slots


def _check(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    if q.dim() != 4 or w.shape != q.shape[:3] or k.dim() != 3 or k.shape[0] != q.shape[0] \
            or k.shape[2] != q.shape[3]:
        raise ValueError(f"expected q (B,T,H_I,d_I), w (B,T,H_I), k (B,S,d_I); got q {tuple(q.shape)}, "
                         f"w {tuple(w.shape)}, k {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one float dtype (float16, bfloat16, float32); "
                         f"got {q.dtype}, {k.dtype}")
    if not w.is_floating_point():
        raise ValueError(f"w must be floating point, got {w.dtype}")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.dim() != 2
                                  or key_valid.shape[0] != q.shape[0] or key_valid.shape[1] < k.shape[1]):
        raise ValueError(f"key_valid must be bool (B, >=S) = ({q.shape[0]}, >={k.shape[1]}); got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")


@torch.no_grad()
def select_topk_triton(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int = 0,
                       key_valid: torch.Tensor | None = None, window: int = 0, sink: int = 0,
                       block: int | None = None, block_s: int = _BLOCK_S) -> torch.Tensor:
    """Drop-in for `select_topk` (see the module docstring). `block` = queries per pass (by
    default as many as fit `_CANDIDATE_BUDGET_BYTES`); `block_s` = keys per stage-1 program."""
    if window or sink:
        # The forced slots are an optional extension; its torch path is exact and rarely hot.
        return select_topk_torch(q, w, k, topk, q_start=q_start, key_valid=key_valid, window=window,
                                 sink=sink, block=block)
    _check(q, w, k, key_valid)
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
    B, T, _, _ = q.shape
    S = k.shape[1]
    K = min(topk, S)
    out = torch.full((B, T, K), -1, dtype=torch.long, device=q.device)
    if K <= 0 or T == 0:
        return out
    q, k, w = q.contiguous(), unit_stride_rows(k), w.float().contiguous()
    valid_u8 = key_valid[:, :S].to(torch.uint8).contiguous() if key_valid is not None else None
    if block is None:
        keep = min(_pow2(K), block_s)
        per_query = B * triton.cdiv(min(S, q_start + T), block_s) * keep * (4 if keep == block_s else 8)
        block = max(1, _CANDIDATE_BUDGET_BYTES // per_query)
    columns = torch.arange(triton.cdiv(S, block_s) * block_s, device=q.device)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        n_keys = min(S, q_start + t1)          # keys after the chunk's last query never count
        vals, slots = _candidates(q[:, t0:t1], w[:, t0:t1], k[:, :n_keys], K, q_start + t0,
                                  valid_u8, block_s)
        kk = min(K, n_keys)
        codes = order_codes(vals, columns[: vals.shape[-1]] if slots is None else slots)
        out[:, t0:t1, :kk] = topk_ordered(codes, kk)
    return out


register_selector("triton", select_topk_triton)

__all__ = ["select_topk_triton"]
