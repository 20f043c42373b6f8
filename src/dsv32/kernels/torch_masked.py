"""Sparse MLA computed densely under a mask: the same math as the gather kernel
(`torch_sparse.py`), for the shapes where dense attention is the faster way to compute it.

Each query attends exactly to its selected key slots: the indexer's selection becomes an additive
mask (0 at a selected slot, -inf elsewhere) over the full score row, and SDPA does the rest --
scores, softmax, weighted sum, and in backward the flash-style recomputation. Cost O(T·S·H·(dk+dv))
instead of the gather kernel's O(T·K·H·2C), but in large well-shaped matmuls with no per-block
gather or scattered gradient: with few heads (small batched matmuls) it wins below a crossover
length; `choose_masked` is the rule, `docs/math.md` §3 the measurements.

Two forms, both over the same selection:

* ``sparse_mla_masked`` -- the `sparse_mla` backend signature, absorbed form: keys and values are
  the latent rows [c_kv ; k_r] themselves (q/k/v head dim C, so SDPA's fused CPU kernel applies),
  output = the first `dv` columns;
* ``absorb_attend_masked`` -- the `sparse_mla_absorbed` form, expanded: per-head keys
  [c_kv W_uk^T ; k_r] and values c_kv W_uv^T (zero-padded to the key dim, for the fused kernel),
  cheaper when d_n + d_r + d_v < 2C (every preset: the latent rank r exceeds the per-head dims).

In training (S == T, a causal selection) one SDPA call covers all queries with the kernel's causal
block skipping on top of the mask; otherwise queries go in chunks of `_QUERY_CHUNK`, and a chunk
only scores keys up to its largest selected slot. A query with no selected key gets output 0
and lse -inf, as in the gather kernel. Selections never repeat a slot; a repeated slot would count
once here (as in the reference) and twice in the gather kernel. On CPU the math is float32 and
the fused flash kernel returns the lse with the output; other devices run the public SDPA under the
same additive mask and compute the lse from the scores (not measured: no GPU here), and "auto"
never picks this path there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_QUERY_CHUNK = 256                 # queries per SDPA call: the masked upper triangle costs ~chunk/(2T) extra
_MASK_BUDGET_BYTES = 64 * 2**20    # the one-call causal form's (B, T, S) float32 mask


def _chunk_mask(idx: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (B, n, K) selected slots (-1 empty) -> additive mask (B, 1, n, n_keys) float32 and
    has_key (B, n) bool. A row with no key gets slot 0 unmasked (finite softmax; zeroed after)."""
    B, n, _ = idx.shape
    has_key = (idx >= 0).any(-1)
    mask = torch.full((B, n, n_keys + 1), float("-inf"), dtype=torch.float32, device=idx.device)
    mask.scatter_(-1, torch.where(idx >= 0, idx, n_keys), 0.0)     # empty slots -> spare column
    mask = mask[..., :n_keys]
    mask[..., 0].masked_fill_(~has_key, 0.0)
    return mask[:, None], has_key


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, n, D), k/v (B, H, S, D), additive mask (B, 1, n, S) -> out (B, H, n, D), lse (B, H, n).
    `causal` (n == S, key j visible to query i only if j <= i) lets the kernel skip whole blocks
    above the diagonal; the mask already says the same, so the result does not change."""
    if q.device.type == "cpu" and q.dtype == torch.float32:
        # The fused CPU flash kernel returns the log-sum-exp with the output (and has a backward).
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    with torch.no_grad():
        lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale + mask, dim=-1)
    return out, lse


def _chunks(indices: torch.Tensor, S: int):
    """(t0, t1, n_keys, causal): the SDPA calls. One causal call over all T queries when the
    selection is causal with queries at slots 0..T-1 (training: S == T, every slot <= its query)
    and the mask fits `_MASK_BUDGET_BYTES`; else chunks of `_QUERY_CHUNK` queries, each scoring
    the keys up to its largest selected slot."""
    B, T, _ = indices.shape
    if T == S and B * T * S * 4 <= _MASK_BUDGET_BYTES and \
            bool((indices <= torch.arange(T, device=indices.device)[:, None]).all()):
        yield 0, T, S, True
        return
    for t0 in range(0, T, _QUERY_CHUNK):
        t1 = min(T, t0 + _QUERY_CHUNK)
        yield t0, t1, max(1, min(S, int(indices[:, t0:t1].max()) + 1)), False


def sparse_mla_masked(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                      dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of `reference.py`: q (B, T, H, C), kv (B, S, C), indices (B, T, K) -> out (B, T, H, dv)
    in q's dtype, lse (B, T, H) float32. Differentiable in q and kv."""
    B, T, H, C = q.shape
    S = kv.shape[1]
    if T == 0 or S == 0 or indices.shape[-1] == 0:          # no keys anywhere: output 0, lse -inf
        return (q.new_zeros(B, T, H, dv),
                torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device))
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    qc, kvc = q.to(compute), kv.to(compute)
    outs, lses = [], []
    for t0, t1, n_keys, causal in _chunks(indices, S):
        mask, has_key = _chunk_mask(indices[:, t0:t1], n_keys)
        k = kvc[:, None, :n_keys].expand(B, H, n_keys, C)
        o, lse = _attend(qc[:, t0:t1].transpose(1, 2), k, k, mask, scale, causal)
        outs.append(o[..., :dv].transpose(1, 2) * has_key[:, :, None, None].to(compute))
        lses.append(lse.transpose(1, 2).float().masked_fill(~has_key[..., None], float("-inf")))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1).detach()


def absorb_attend_masked(q_n: torch.Tensor, q_r: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                         w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """`sparse_mla_absorbed` in the expanded form: q_n (B, T, H, d_n), q_r (B, T, H, d_r), kv (B, S, C),
    w_uk (H, d_n, r), w_uv (H, d_v, r) -> (B, T, H, d_v) in kv's dtype. Differentiable in all of them."""
    B, T, H, d_n = q_n.shape
    S, r, d_r, d_v = kv.shape[1], w_uk.shape[-1], q_r.shape[-1], w_uv.shape[1]
    dtype = kv.dtype
    if T == 0 or S == 0 or indices.shape[-1] == 0:
        return kv.new_zeros(B, T, H, d_v)
    compute = torch.float32 if kv.device.type == "cpu" else dtype
    c_kv, k_r = kv.to(compute).split([r, d_r], dim=-1)
    k_n = torch.einsum("bsr,hdr->bhsd", c_kv, w_uk.to(compute))                  # (B, H, S, d_n)
    keys = torch.cat((k_n, k_r[:, None].expand(B, H, S, d_r)), dim=-1)             # (B, H, S, d_n + d_r)
    values = torch.einsum("bsr,hvr->bhsv", c_kv, w_uv.to(compute))                # (B, H, S, d_v)
    dk = d_n + d_r
    if d_v < dk:                                  # the fused CPU kernel needs equal q/k/v head dims
        values = F.pad(values, (0, dk - d_v))
    q = torch.cat((q_n, q_r), dim=-1).to(compute).transpose(1, 2)                  # (B, H, T, dk)
    outs = []
    for t0, t1, n_keys, causal in _chunks(indices, S):
        mask, has_key = _chunk_mask(indices[:, t0:t1], n_keys)
        o, _ = _attend(q[:, :, t0:t1], keys[:, :, :n_keys], values[:, :, :n_keys], mask, scale, causal)
        outs.append(o[..., :d_v].transpose(1, 2) * has_key[:, :, None, None].to(compute))
    return torch.cat(outs, 1).to(dtype)


# The cost rule. Units: one (query, key, head, head-dim) multiply-add of the masked path's SDPA.
# The gather kernel pays per selected (query, key) a row gather and its scattered gradient
# (~_GATHER_ROW per latent column) plus H small batched matmuls over 2C columns that run at
# ~1/_GATHER_HEAD of SDPA's rate. Fitted to the forward+backward crossovers measured on CPU
# (`benchmarks/sparse_train.py --heads 4 16 64`; docs/math.md §3).
_GATHER_ROW = 18.0
_GATHER_HEAD = 0.8


def choose_masked(T: int, S: int, H: int, K: int, d_qk: int, d_v: int, C: int) -> bool:
    """True where the expanded masked path (`absorb_attend_masked`) is estimated cheaper than the
    gather kernel for T queries at the last T of S key slots, H heads, K selected slots, per-head
    key dim d_qk (= d_n + d_r), value dim d_v, latent row C."""
    if T == S and T * S * 4 <= _MASK_BUDGET_BYTES:                  # one causal call: the lower triangle
        reach = (T + 1) / 2
    else:                                                           # keys a query's chunk scores, mean
        reach = max(1.0, min(S, S - T + (T + _QUERY_CHUNK) / 2))
    masked = T * reach * H * (d_qk + max(d_v, d_qk))
    gather = T * min(K, S) * (_GATHER_ROW * C + _GATHER_HEAD * H * 2 * C)
    return masked < gather
