"""The lightning indexer and top-k token selection of DeepSeek Sparse Attention (docs/math.md §4-5).

    qI = W_Iq c_q -> (B, T, H_I, d_I)          kI = LayerNorm(W_Ik x) -> (B, S, d_I)
    w  = W_Iw x * H_I^-0.5 (float32)           RoPE (half-split) on the first d_r dims of qI, kI
    I(t, s) = sum_j w(t, j) * d_I^-0.5 * ReLU(qI(t, j) . kI(s))
    S_t = top-k over allowed s (causal, not padding), k_eff = min(k, #allowed)

Scores are computed one block of queries at a time, so selection needs O(block·S) memory,
never T×S, and keys past the block's last query are never scored. The optional extension of
docs/math.md §5 forces the last `window` and first `sink` tokens into every set, on top of the
indexer's k (they are excluded from the top-k so no slot is selected twice).

Deployment numerics (`fp8=True`): a Hadamard rotation of qI and kI (orthogonal, dot products
unchanged in exact arithmetic) then FP8-e4m3 quantise-dequantise with power-of-two scales per
128-wide block, as production does; scores are then computed from the dequantised values.

Slots versus positions: keys are addressed by *slot* (their index along S). A query block
starts at slot `q_start`; key slot s is allowed for the query at slot q iff s <= q and
`key_valid[b, s]`. With left padding, slots and RoPE positions differ; causality is by slot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .norms import Float32Linear
from .rope import apply_rope_half

_SCORE_BUDGET_BYTES = 64 * 2**20   # (block, S) float32 scores per block of queries
_ROWS_PER_BLOCK = 2048             # queries x H_I rows per matmul: a good GEMM shape on CPU
_DECODE_ROWS = 256                 # at most this many (query, head) rows: key-major product
_DECODE_KEY_TILE = 8192            # keys per tile of the key-major product (bounds its memory)
_KEY_TILE = 512                    # keys per tile: the (rows, tile) product stays in cache
_FP8_MAX = 448.0                   # largest finite float8_e4m3fn


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix (n a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def fp8_e4m3_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise to FP8 e4m3 with one power-of-two scale per `block` elements of the last dim,
    then dequantise (float32)."""
    d = x.shape[-1]
    block = min(block, d)
    if d % block:
        raise ValueError(f"last dim {d} must be a multiple of the FP8 block {block}")
    xb = x.float().reshape(*x.shape[:-1], d // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / _FP8_MAX)))
    q = (xb / scale).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(x.shape)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.window, self.sink = cfg.index_window, cfg.index_sink
        self.fp8 = cfg.index_fp8
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Float32Linear(cfg.hidden_size, self.n_heads, bias=False)

    # -------------------------------------------------------------------------------
    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """kI (B, T, d_I) float32, RoPE'd (and FP8-rounded when `fp8`)."""
        k = self.k_norm(self.wk(x)).float()
        k = torch.cat((apply_rope_half(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim:]), -1)
        return self._numerics(k)

    def queries(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qI (B, T, H_I, d_I) float32 and head weights w (B, T, H_I) float32, with the
        H_I^-0.5 and d_I^-0.5 scales folded into w."""
        B, T, _ = c_q.shape
        q = self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim).float()
        q = torch.cat((apply_rope_half(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim:]), -1)
        w = F.linear(x.float(), self.weights_proj.weight.float())
        w = w * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return self._numerics(q), w

    def _numerics(self, t: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return t
        h = hadamard_matrix(self.head_dim, device=t.device)
        return fp8_e4m3_roundtrip(t @ h)

    # -------------------------------------------------------------------------------
    def select(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_start: int = 0,
               key_valid: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        """Selected key slots (B, T, width) int64, -1 for empty slots; see `select_topk`.
        With backend "auto" or "triton" the fused Triton selector runs where available (CUDA);
        any other backend, and CPU, use `select_topk`."""
        fused = kernels.index_selector(q.device) if backend in ("auto", "triton") else None
        return (fused or select_topk)(q, w, k, self.topk, q_start=q_start, key_valid=key_valid,
                                      window=self.window, sink=self.sink)


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I(t, s) for q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I) -> (B, T, S) float32.
    Differentiable; builds (B, T, H_I, S), so call it on blocks of queries."""
    B, T, Hi, d = q.shape
    s = torch.matmul(q.reshape(B, T * Hi, d), k.transpose(1, 2)).view(B, T, Hi, -1)
    s = F.relu(s)
    return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)


@torch.no_grad()
def index_scores_tiled(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, tile: int = _KEY_TILE) -> torch.Tensor:
    """`index_scores` without autograd, one tile of keys at a time: the (T·H_I, tile) product,
    its ReLU and the head-weighted sum stay in cache instead of streaming a (T, H_I, S) tensor
    through memory three times (measured 38% -> ~100% of the fp32 matmul rate on CPU)."""
    B, T, Hi, d = q.shape
    S = k.shape[1]
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    if T * Hi <= _DECODE_ROWS:
        return _index_scores_key_major(q, w, k, out)
    tile = max(1, min(tile, S))
    buf = torch.empty(T * Hi * tile, dtype=torch.float32, device=q.device)
    tmp = torch.empty(T * tile, dtype=torch.float32, device=q.device)
    for b in range(B):
        q2, wb, kt = q[b].reshape(T * Hi, d).float(), w[b].float().unsqueeze(1), k[b].float().t()
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            sc = buf[: T * Hi * n].view(T * Hi, n)
            torch.mm(q2, kt[:, s0:s0 + n], out=sc)
            sc.relu_()
            red = tmp[: T * n].view(T, 1, n)
            torch.bmm(wb, sc.view(T, Hi, n), out=red)
            out[b, :, s0:s0 + n] = red.view(T, n)
    return out


def _index_scores_key_major(q, w, k, out):
    """Few query rows (decode): one (S, T·H_I) product with the keys as the long side -- the
    shape a CPU GEMM runs near peak -- then ReLU and the head-weighted sum as a batched product."""
    B, T, Hi, d = q.shape
    S = k.shape[1]
    tile = max(1, min(S, _DECODE_KEY_TILE))
    buf = torch.empty(tile * T * Hi, dtype=torch.float32, device=q.device)
    for b in range(B):
        qt, wb = q[b].reshape(T * Hi, d).float().t(), w[b].float().unsqueeze(2)
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            sc = buf[: n * T * Hi].view(n, T * Hi)
            torch.mm(k[b, s0:s0 + n].float(), qt, out=sc)                          # (n, T·H_I)
            sc.relu_()
            out[b, :, s0:s0 + n] = torch.bmm(sc.view(n, T, Hi).transpose(0, 1), wb).squeeze(2)
    return out


def allowed_keys(num_keys: int, q_slots: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B or 1, T, S): causal by slot and not padding."""
    s = torch.arange(num_keys, device=q_slots.device)
    allowed = s[None, None, :] <= q_slots[None, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :num_keys]
    return allowed


def _forced_slots(q_slots: torch.Tensor, key_valid: torch.Tensor | None, B: int, window: int,
                  sink: int) -> torch.Tensor:
    """Slots of the last `window` and first `sink` real tokens for each query, (B, T, window+sink),
    -1 where not allowed; a sink slot inside the window is dropped so no slot repeats."""
    device = q_slots.device
    T = q_slots.shape[0]
    parts = []
    if window:
        win = q_slots[:, None] - torch.arange(window, device=device)        # (T, w)
        parts.append(win.expand(B, T, window))
    if sink:
        first = (key_valid.long().argmax(dim=1) if key_valid is not None
                 else torch.zeros(B, dtype=torch.long, device=device))        # first real slot
        snk = first[:, None, None] + torch.arange(sink, device=device)       # (B, 1, sink)
        snk = snk.expand(B, T, sink)
        in_window = snk > (q_slots[None, :, None] - window)
        parts.append(torch.where(in_window, -1, snk))
    slots = torch.cat(parts, dim=-1)
    ok = (slots >= 0) & (slots <= q_slots[None, :, None])
    if key_valid is not None:
        ok = ok & torch.gather(key_valid, 1, slots.clamp(min=0).view(B, -1)).view_as(slots)
    return torch.where(ok, slots, -1)


@torch.no_grad()
def select_topk(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_start: int = 0,
                key_valid: torch.Tensor | None = None, window: int = 0, sink: int = 0,
                block: int | None = None) -> torch.Tensor:
    """Top-k key slots per query by indexer score, over allowed keys only.

    q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I); queries sit at slots q_start..q_start+T-1.
    Returns (B, T, window + sink + min(topk, S)) int64; -1 marks an empty slot (fewer allowed
    keys than slots). Forced window/sink slots come first."""
    B, T, Hi, _ = q.shape
    S = k.shape[1]
    K = min(topk, S)
    width = window + sink + K
    out = torch.full((B, T, width), -1, dtype=torch.long, device=q.device)
    if block is None:
        block = max(1, min(_ROWS_PER_BLOCK // Hi, _SCORE_BUDGET_BYTES // max(1, 4 * S * B)))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        q_slots = torch.arange(q_start + t0, q_start + t1, device=q.device)
        n_keys = min(S, q_start + t1)                     # keys past the last query never count
        scores = index_scores_tiled(q[:, t0:t1], w[:, t0:t1], k[:, :n_keys])
        scores.masked_fill_(~allowed_keys(n_keys, q_slots, key_valid), float("-inf"))
        col = 0
        if window or sink:
            forced = _forced_slots(q_slots, key_valid, B, window, sink)
            out[:, t0:t1, : window + sink] = forced
            taken = torch.zeros(B, t1 - t0, n_keys + 1, dtype=torch.bool, device=q.device)
            taken.scatter_(-1, torch.where(forced >= 0, forced, n_keys), True)
            scores.masked_fill_(taken[..., :n_keys], float("-inf"))
            col = window + sink
        kk = min(K, n_keys)
        vals, idx = scores.topk(kk, dim=-1)
        out[:, t0:t1, col: col + kk] = torch.where(torch.isfinite(vals), idx, -1)
    return out
