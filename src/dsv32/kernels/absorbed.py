"""Absorbed MLA around a sparse attention kernel: absorb -> attend -> un-absorb (docs/math.md §3).

    q_lat = [q_n W_uk ; q_r]   (B, T, H, C)    C = r + d_r: the query in latent space
    o     = attend(q_lat, kv, indices)          (B, T, H, r)  over the selected latent rows
    out   = o W_uv^T           (B, T, H, d_v)

With gradients needed the whole sequence goes through one kernel call (autograd sees three
ops). Without, queries go in chunks of at most `_CHUNK_BUDGET_BYTES` of absorbed queries, and
every chunk reuses the same work buffers: the absorbed queries of a long prefill would
otherwise take (B, T, H, C) floats (several GiB at H = 128, T = 16K), and on CPU fresh
multi-MB tensors per chunk cost page faults that rival the matmuls. Both give the same values.

Decode (at most `_GEMV_ROWS` query rows per chunk) un-absorbs as W_uv o^T, (H, d_v, r) x (H, r, n):
each output is then a dot product along a contiguous row of W_uv, which a single thread reads
at ~23 GB/s against ~11 GB/s for o W_uv^T (a (1, r) row times a transposed view), 1.4-1.6 ms
against 2.4-3.0 ms for the 32 MB W_uv at H = 128 (one thread, CPU clock). From 8 rows on the
two are within noise, and prefill keeps the row-times-matrix form.
"""

from __future__ import annotations

from typing import Callable

import torch

_CHUNK_BUDGET_BYTES = 128 * 2**20   # absorbed queries (B, chunk, H, C) per chunk
_GEMV_ROWS = 4                      # at most this many rows (B x chunk): un-absorb as W_uv o^T


def absorb_attend(attend: Callable, q_n: torch.Tensor, q_r: torch.Tensor, kv: torch.Tensor,
                  indices: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """q_n (B, T, H, d_n), q_r (B, T, H, d_r), kv (B, S, C) latent rows, indices (B, T, K),
    w_uk (H, d_n, r), w_uv (H, d_v, r) -> (B, T, H, d_v) in kv's dtype (the compute dtype)."""
    B, T, H, d_n = q_n.shape
    r, d_v, C = w_uk.shape[-1], w_uv.shape[1], kv.shape[-1]
    dtype = kv.dtype
    w_uk, w_uv = w_uk.to(dtype), w_uv.to(dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_n, q_r, kv, w_uk, w_uv)):
        q_lat = torch.cat((torch.einsum("bthd,hdr->bthr", q_n.to(dtype), w_uk), q_r.to(dtype)), dim=-1)
        o, _ = attend(q_lat, kv, indices, scale, r)
        return torch.einsum("bthr,hvr->bthv", o, w_uv)
    chunk = max(1, min(T, _CHUNK_BUDGET_BYTES // (dtype.itemsize * B * H * C)))
    q_buf = torch.empty(B * chunk * H * C, dtype=dtype, device=kv.device)
    prod_buf = torch.empty(H * B * chunk * max(r, d_v), dtype=dtype, device=kv.device)
    result = torch.empty(B, T, H, d_v, dtype=dtype, device=kv.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        n = t1 - t0
        prod = prod_buf[: H * B * n * r].view(H, B * n, r)
        torch.bmm(q_n[:, t0:t1].to(dtype).reshape(B * n, H, d_n).transpose(0, 1), w_uk, out=prod)
        q_lat = q_buf[: B * n * H * C].view(B, n, H, C)
        q_lat[..., :r].copy_(prod.view(H, B, n, r).permute(1, 2, 0, 3))
        q_lat[..., r:].copy_(q_r[:, t0:t1])
        o, _ = attend(q_lat, kv, indices[:, t0:t1], scale, r)
        o_h = o.reshape(B * n, H, r).transpose(0, 1)                       # (H, B n, r)
        if B * n <= _GEMV_ROWS:
            back = prod_buf[: H * d_v * B * n].view(H, d_v, B * n)
            torch.bmm(w_uv, o_h.transpose(1, 2), out=back)
            result[:, t0:t1].copy_(back.view(H, d_v, B, n).permute(2, 3, 0, 1))
        else:
            back = prod_buf[: H * B * n * d_v].view(H, B * n, d_v)
            torch.bmm(o_h, w_uv.transpose(1, 2), out=back)
            result[:, t0:t1].copy_(back.view(H, B, n, d_v).permute(1, 2, 0, 3))
    return result
