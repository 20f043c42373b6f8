"""The lightning indexer's scores and top-k selection in plain torch (CPU and GPU), shapes and
semantics those of `reference.select_topk_reference` (docs/math.md §4-5).

Selection order. The selected set is a function of the scores alone: keys are ranked by
(score descending, key slot ascending), so among equal scores the EARLIER key wins, and -0.0
ranks as 0.0. Every selector (this one, the reference, the Triton one) uses this order, so the
set does not depend on how queries are chunked (one-shot prefill, chunked prefill, decode) or on
which kernel runs -- only on the scores. Exact ties are common: when all of a query's head
weights are negative, every key whose ReLU terms are all zero scores exactly 0.0, the maximum.
The order is encoded as one int64 per (query, key): an order-preserving integer image of the
float32 score in the high word and (2^31 - 1 - slot) in the low word, so one `topk` over the
codes is exact, needs no tie resolution pass and returns the winners best first.

Scores are computed one block of queries at a time, so selection needs O(block·S) memory,
never T×S, and keys past the block's last query are never scored. The optional extension of
docs/math.md §5 forces the last `window` and first `sink` tokens into every set, on top of the
indexer's k (they are excluded from the top-k so no slot is selected twice).

Slots versus positions: keys are addressed by *slot* (their index along S). A query block
starts at slot `q_start`; key slot s is allowed for the query at slot q iff s <= q and
`key_valid[b, s]`. With left padding, slots and RoPE positions differ; causality is by slot.
"""

from __future__ import annotations

import torch

from .onednn import onednn_op as _onednn_linear
from .reference import allowed_keys, forced_slots

_SCORE_BUDGET_BYTES = 64 * 2**20   # per block of queries: (block, S) float32 scores + their int64 codes
_ROWS_PER_BLOCK = 1024             # queries x H_I per block: a good GEMM shape, few keys past the diagonal
_DECODE_ROWS = 256                 # at most this many (query, head) rows: key-major product
_DECODE_TILE_BYTES = 2 * 2**20     # the key-major product's tile: 2 MiB (8K keys x 64 heads, 128K x 4)
_FUSED_TILE_BYTES = 2**20          # the same with oneDNN's fused product + ReLU: 1 MiB (4K keys x 64 heads)
_KEY_TILE = 512                    # keys per tile: the (rows, tile) product stays in cache
_LOW = 0x7FFFFFFF                  # low word of a code: _LOW - slot (slots < 2^31)


@torch.no_grad()
def index_scores_tiled(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, tile: int = _KEY_TILE,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """`index_scores` without autograd, one tile of keys at a time: the (T·H_I, tile) product,
    its ReLU and the head-weighted sum stay in cache instead of streaming a (T, H_I, S) tensor
    through memory three times (measured 38% -> ~100% of the fp32 matmul rate on CPU).
    `out`: an optional (B, T, S) float32 buffer to write into (the selection reuses one)."""
    B, T, Hi, d = q.shape
    S = k.shape[1]
    if out is None:
        out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    if T * Hi <= _DECODE_ROWS:
        return _index_scores_key_major(q, w, k, out)
    tile = max(1, min(tile, S))
    # oneDNN (product + ReLU in one call, ~2x MKL's fp32 rate on the AMD CPUs we measured) over the
    # selection's standard block of _ROWS_PER_BLOCK rows and whole tiles only: oneDNN compiles a
    # kernel per shape, and these two are fixed; other shapes (a last block, a short sequence,
    # the last tile) take torch.mm.
    fused = _linear_relu() if q.device.type == "cpu" and T * Hi == _ROWS_PER_BLOCK else None
    buf = torch.empty(T * Hi * tile, dtype=torch.float32, device=q.device)
    tmp = torch.empty(T * tile, dtype=torch.float32, device=q.device)
    for b in range(B):
        q2, wb, kt = q[b].reshape(T * Hi, d).float(), w[b].float().unsqueeze(1), k[b].float().t()
        if fused is not None:
            q2 = q2.contiguous()
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            if fused is not None and n == tile:
                sc = fused(q2, k[b, s0:s0 + n].float().contiguous(), None, "relu", [None], "")   # (T·H_I, n)
            else:
                sc = buf[: T * Hi * n].view(T * Hi, n)
                torch.mm(q2, kt[:, s0:s0 + n], out=sc)
                sc.relu_()
            red = tmp[: T * n].view(T, 1, n)
            torch.bmm(wb, sc.view(T, Hi, n), out=red)
            out[b, :, s0:s0 + n] = red.view(T, n)
    return out


def _index_scores_key_major(q, w, k, out):
    """Few query rows (decode): one (S, T·H_I) product with the keys as the long side, then ReLU
    and the head-weighted sum: one matrix-vector product over the tile for a single query (no
    batched product, no copy of the result), a batched product for a few.

    On CPU with oneDNN the product and the ReLU are one oneDNN call (`_linear_relu`), in 1 MiB
    tiles: one thread measured 7.9-9.2 ms against 16-19 ms for MKL's product + ReLU at S = 64K,
    H_I = 64, d_I = 128 (oneDNN's fp32 GEMM runs ~2x MKL's on the AMD EPYC CPUs we measured).
    oneDNN compiles a kernel for each new shape (~0.5-2 ms), so it runs only over whole tiles,
    whose shape is fixed by the model (T·H_I): the last, partial tile, and a cache shorter than
    one tile -- whose length changes with every decoded token, as in every GRPO rollout -- take
    `torch.mm` into a reused buffer and an in-place ReLU, in 2 MiB tiles that keep the product in
    the caches while ReLU and the head sum read it (8 MiB measured ~10% slower)."""
    B, T, Hi, d = q.shape
    S = k.shape[1]
    fused_tile = _FUSED_TILE_BYTES // (4 * T * Hi)
    fused = _linear_relu() if q.device.type == "cpu" and S >= fused_tile else None   # whole tiles only
    tile = fused_tile if fused is not None else max(1, min(S, _DECODE_TILE_BYTES // (4 * T * Hi)))
    buf = torch.empty(tile * T * Hi, dtype=torch.float32, device=q.device)
    for b in range(B):
        q2, wb = q[b].reshape(T * Hi, d).float().contiguous(), w[b].float()
        qt = q2.t()
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            keys = k[b, s0:s0 + n].float()
            if fused is not None and n == tile:
                sc = fused(keys.contiguous(), q2, None, "relu", [None], "")             # (n, T·H_I)
            else:
                sc = buf[: n * T * Hi].view(n, T * Hi)
                torch.mm(keys, qt, out=sc)
                sc.relu_()
            if T == 1:
                torch.mv(sc, wb[0], out=out[b, 0, s0:s0 + n])
            else:
                out[b, :, s0:s0 + n] = torch.bmm(sc.view(n, T, Hi).transpose(0, 1), wb.unsqueeze(2)).squeeze(2)
    return out


def _linear_relu():
    """oneDNN's fused ReLU(x @ W^T) for float32 CPU tensors (the op torch's compiler uses), or
    None where torch was built without oneDNN or it is switched off (`torch.backends.mkldnn.enabled`):
    then the plain `torch.mm` path runs."""
    return _onednn_linear() if torch.backends.mkldnn.enabled else None


def order_codes(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """int64 codes whose integer order is the selection order: (score desc, slot asc).
    scores float32 (any shape), slots int (broadcastable to it). The high word is the float's
    bits with the magnitude bits of negatives flipped (monotone in the value; -0.0 first mapped
    to 0.0), the low word `_LOW - slot`. -inf (not allowed) codes below every finite score."""
    scores = scores.float()
    codes = torch.empty(scores.shape, dtype=torch.int64, device=scores.device)
    return codes_into_(scores.add(0.0), _LOW - slots.to(torch.int64), codes)


def codes_into_(scores: torch.Tensor, low: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`order_codes` written into `codes` (int64, scores' shape) with the low words `low`
    (= _LOW - slot, broadcastable) given, in a few in-place passes; `scores` (float32,
    contiguous, -0.0 already mapped to 0.0) is overwritten. The passes reuse the caller's
    buffers: a fresh (block, S) int64 tensor per op costs several times the op itself on CPU
    (first-touch page faults of a large allocation)."""
    bits = scores.view(torch.int32)
    sign = codes.view(-1).view(torch.int32)[: bits.numel()].view(bits.shape)   # scratch: codes' first half
    torch.bitwise_right_shift(bits, 31, out=sign)            # 0 or -1
    bits.bitwise_xor_(sign.bitwise_and_(_LOW))               # flip the magnitude bits of negatives
    codes.copy_(bits)                                        # overwrites the scratch; sign-extends
    return codes.bitwise_left_shift_(32).bitwise_or_(low)


_NEG_INF_KEY = int(order_codes(torch.tensor([float("-inf")]), torch.zeros(1, dtype=torch.long)) >> 32)


def topk_ordered(codes: torch.Tensor, kk: int, ordered: bool = True) -> torch.Tensor:
    """The `kk` best of each row of `codes` (from `order_codes`), best first, as slots int64;
    -1 where the score was -inf (fewer allowed keys than kk). `ordered=False`: the same set in
    an unspecified order (skips sorting the winners, about a third of the top-k's time)."""
    top = codes.topk(kk, dim=-1, sorted=ordered).values
    return torch.where((top >> 32) > _NEG_INF_KEY, _LOW - (top & 0xFFFFFFFF), -1)


@torch.no_grad()
def select_topk_torch(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int = 0,
                      key_valid: torch.Tensor | None = None, window: int = 0, sink: int = 0,
                      block: int | None = None, ordered: bool = True) -> torch.Tensor:
    """Top-k key slots per query by indexer score, over allowed keys only, in the order of the
    module docstring. `block` = queries scored at once (default: bounded by _ROWS_PER_BLOCK
    matmul rows and _SCORE_BUDGET_BYTES). `ordered=False`: each row's top-k in an unspecified
    order -- the same set, for callers that read it as a set (the masked attention path).

    q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I); queries sit at slots q_start..q_start+T-1.
    Returns (B, T, window + sink + min(topk, S)) int64; -1 marks an empty slot (fewer allowed
    keys than slots). Forced window/sink slots come first, then the top-k best first."""
    B, T, Hi, _ = q.shape
    S = k.shape[1]
    K = min(topk, S)
    width = window + sink + K
    out = torch.full((B, T, width), -1, dtype=torch.long, device=q.device)
    if block is None:
        block = max(1, min(_ROWS_PER_BLOCK // Hi, _SCORE_BUDGET_BYTES // max(1, 12 * S * B)))
    block = max(1, min(block, T))
    slots = torch.arange(S, device=q.device)
    low = _LOW - slots
    # One scores and one codes buffer for all blocks (views of the block's contiguous shape).
    score_buf = torch.empty(B * block * S, dtype=torch.float32, device=q.device)
    code_buf = torch.empty(B * block * S, dtype=torch.int64, device=q.device)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        q_slots = torch.arange(q_start + t0, q_start + t1, device=q.device)
        n_keys = min(S, q_start + t1)                     # keys past the last query never count
        shape = (B, t1 - t0, n_keys)
        scores = index_scores_tiled(q[:, t0:t1], w[:, t0:t1], k[:, :n_keys],
                                    out=score_buf[: B * (t1 - t0) * n_keys].view(shape))
        scores.add_(0.0)                                  # -0.0 -> 0.0 (ranks as 0.0)
        _mask_disallowed_(scores, q_start + t0, q_slots, slots[:n_keys], key_valid)
        col = 0
        if window or sink:
            forced = forced_slots(q_slots, key_valid, B, window, sink)
            out[:, t0:t1, : window + sink] = forced
            taken = torch.zeros(B, t1 - t0, n_keys + 1, dtype=torch.bool, device=q.device)
            taken.scatter_(-1, torch.where(forced >= 0, forced, n_keys), True)
            scores.masked_fill_(taken[..., :n_keys], float("-inf"))
            col = window + sink
        kk = min(K, n_keys)
        codes = codes_into_(scores, low[:n_keys], code_buf[: B * (t1 - t0) * n_keys].view(shape))
        out[:, t0:t1, col: col + kk] = topk_ordered(codes, kk, ordered)
    return out


def _mask_disallowed_(scores: torch.Tensor, first: int, q_slots: torch.Tensor, key_slots: torch.Tensor,
                      key_valid: torch.Tensor | None) -> None:
    """-inf where a key is not allowed (after its query's slot, or padding), in place; `first` =
    the block's first query slot. Only keys after it can be causally masked, so the causal part
    touches the (block, block) corner of the scores, not all of them."""
    c0 = min(scores.shape[-1], first + 1)
    if c0 < scores.shape[-1]:
        scores[..., c0:].masked_fill_(key_slots[c0:] > q_slots[:, None], float("-inf"))
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, : scores.shape[-1]], float("-inf"))
