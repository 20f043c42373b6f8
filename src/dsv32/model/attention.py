"""Multi-head Latent Attention with DeepSeek Sparse Attention (docs/math.md §3-5).

Shape legend: B batch, T queries, S keys (cache + new), H heads, r = kv_lora_rank,
d_n / d_r / d_v = nope / rope / value head dims, C = r + d_r (one latent row [c_kv ; k_r]).

    c_q = RMSNorm(W_qa x)                  q = W_qb c_q -> (B, T, H, d_n + d_r)
    [c_kv ; k_r] = W_kva x ; c_kv = RMSNorm(c_kv) ; q_r, k_r = RoPE_interleaved(q_r, k_r)

Four ways to attend, chosen by `AttentionOptions` (see context.py):

* dense, expanded  — keys/values per head from W_kvb c_kv; SDPA (training, prefill);
* dense, absorbed  — queries absorbed into the latent, SDPA over [c_kv ; k_r] (MQA);
* sparse, absorbed — the production path: the indexer picks top-k key slots
  (`kernels.select_topk`), then absorb -> gather-attend over those latent rows -> un-absorb
  (`kernels.sparse_mla_absorbed`; the kernels work in blocks of queries). No T×S score or mask
  tensor is built, memory is linear in T;
* sparse, expanded — the dense masked reference (materialises T×S; tests only).

Keep selection: `Records.replay_indices` gives key slots to attend to instead of the indexer's
top-k (GRPO replays the rollout's selections in its training forward, `dsv32.rl.replay`).

Only [c_kv ; k_r] (and the indexer key) ever go to a cache — never expanded keys or values.
On CPU attention math runs in float32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .context import ForwardContext, IndexerInputs
from .indexer import Indexer, allowed_keys
from .norms import RMSNorm
from .rope import apply_rope_interleaved

class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.d_n, self.d_r, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.r = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        H = self.n_heads
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (self.d_n + self.d_r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.r + self.d_r, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r)
        self.kv_b_proj = nn.Linear(self.r, H * (self.d_n + self.d_v), bias=False)
        self.o_proj = nn.Linear(H * self.d_v, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg)

    # ------------------------------------------------------------------ projections
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> c_q (B, T, r_q), q_n (B, T, H, d_n), q_r (B, T, H, d_r),
        latent (B, T, C) = [c_kv ; k_r] with RoPE applied."""
        B, T, _ = x.shape
        c_q = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(c_q).view(B, T, self.n_heads, self.d_n + self.d_r)
        q_n, q_r = q.split([self.d_n, self.d_r], dim=-1)
        c_kv, k_r = self.kv_a_proj_with_mqa(x).split([self.r, self.d_r], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), apply_rope_interleaved(k_r, cos, sin)), dim=-1)
        return c_q, q_n, apply_rope_interleaved(q_r, cos, sin), latent

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, d_n, r) and W_uv (H, d_v, r): the per-head slices of W_kvb."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_n + self.d_v, self.r)
        return w[:, : self.d_n], w[:, self.d_n:]

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, S, C) -> keys (B, S, H, d_n + d_r), values (B, S, H, d_v)."""
        B, S, _ = latent.shape
        c_kv, k_r = latent.split([self.r, self.d_r], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.d_n + self.d_v)
        k_n, v = kv.split([self.d_n, self.d_v], dim=-1)
        k = torch.cat((k_n, k_r[:, :, None, :].expand(B, S, self.n_heads, self.d_r)), dim=-1)
        return k, v

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        opts = ctx.attention
        c_q, q_n, q_r, latent = self.project(x, ctx.cos, ctx.sin)
        k_index = None
        if opts.sparse or ctx.cache is not None:
            with torch.no_grad():
                k_index = self.indexer.keys(x.detach(), ctx.cos, ctx.sin)
        if ctx.cache is not None:
            latent_all, k_index_all = ctx.cache.update(self.layer_idx, latent, k_index, ctx.q_start)
        else:
            latent_all, k_index_all = latent, k_index
        S = latent_all.shape[1]

        # k is read per call; a layer in which every query may see all its keys is exactly dense.
        topk = self.indexer.config.index_topk if opts.topk is None else opts.topk
        select = opts.sparse and not (opts.dense_shortcut and S <= topk)
        form = self._form(opts, T, ctx)
        rec = ctx.records
        if rec.keep_indexer_inputs:  # dense layers too: the indexer warm-up trains under dense attention
            rec.indexer_inputs[self.layer_idx] = IndexerInputs(x.detach(), c_q.detach(), ctx.cos, ctx.sin,
                                                               ctx.key_valid)
        replay = None if rec.replay_indices is None else rec.replay_indices.get(self.layer_idx)
        if replay is not None:
            _check_replay(replay, self.layer_idx, B, T)
        indices = None
        if opts.sparse and (select or rec.record_indices):
            as_set = self._reads_set(q_n, q_r, latent_all, topk, opts, form, select, rec, replay)
            with torch.no_grad():
                q_index, w_index = self.indexer.queries(x.detach(), c_q.detach(), ctx.cos, ctx.sin)
                indices = self.indexer.select(q_index, w_index, k_index_all, ctx.q_start, ctx.key_valid,
                                              opts.backend, topk, ordered=not as_set)
                if replay is not None:
                    indices = _with_replay(indices, replay)
            if rec.record_indices:
                rec.indices[self.layer_idx] = indices.to(torch.int32)

        if select and form == "absorbed":
            out = self._sparse_absorbed(q_n, q_r, latent_all, indices, opts.backend)
        elif select:
            out = self._sparse_expanded(q_n, q_r, latent_all, indices)
        elif form == "absorbed":
            out = self._dense_absorbed(q_n, q_r, latent_all, ctx)
        else:
            out = self._dense_expanded(q_n, q_r, latent_all, ctx)
        q_valid = ctx.query_valid(T)
        if q_valid is not None:
            out = out * q_valid[:, :, None, None].to(out.dtype)   # padding queries attend to nothing
        return self.o_proj(out.reshape(B, T, self.n_heads * self.d_v).to(x.dtype))

    def _reads_set(self, q_n, q_r, latent, topk: int, opts, form: str, select: bool, rec, replay) -> bool:
        """True when nothing reads the selection's order: the masked attention path runs (it
        turns the selection into a mask) and the indices are neither recorded nor replayed."""
        if not select or form != "absorbed" or rec.record_indices or replay is not None:
            return False
        width = self.indexer.window + self.indexer.sink + min(topk, latent.shape[1])
        return kernels.attends_masked(q_n, q_r, latent, width, self.absorbed_weights()[1], opts.backend)

    def _form(self, opts, T: int, ctx: ForwardContext) -> str:
        if opts.form != "auto":
            return opts.form
        if opts.sparse or (ctx.cache is not None and T == 1):
            return "absorbed"
        return "expanded"

    # ------------------------------------------------------------------ the four paths
    def _sparse_absorbed(self, q_n, q_r, latent, indices, backend):
        """Absorb W_uk into the queries, gather-attend over the selected latent rows, un-absorb W_uv."""
        compute = torch.float32 if latent.device.type == "cpu" else latent.dtype
        w_uk, w_uv = self.absorbed_weights()
        return kernels.sparse_mla_absorbed(q_n, q_r, latent.to(compute), indices, w_uk, w_uv, self.scale, backend)

    def _sparse_expanded(self, q_n, q_r, latent, indices):
        k, v = self.expand(latent)
        q = torch.cat((q_n, q_r), dim=-1)
        mask = kernels.indices_to_mask(indices, latent.shape[1])
        out, _ = kernels.masked_attention(q, k, v, mask, self.scale)
        return out

    def _dense_mask(self, ctx: ForwardContext, T: int, S: int, device) -> torch.Tensor | None:
        """None when plain causal (is_causal) applies, else a bool (B|1, 1, T, S) mask in which
        a query may always see itself, so padding rows stay finite (they are zeroed later)."""
        if ctx.key_valid is None and ctx.q_start == 0 and T == S:
            return None
        q_slots = torch.arange(ctx.q_start, ctx.q_start + T, device=device)
        allowed = allowed_keys(S, q_slots, ctx.key_valid)
        allowed = allowed | (torch.arange(S, device=device)[None, None, :] == q_slots[None, :, None])
        return allowed[:, None]

    def _dense_expanded(self, q_n, q_r, latent, ctx):
        B, T, H, _ = q_n.shape
        S = latent.shape[1]
        k, v = self.expand(latent)
        q = torch.cat((q_n, q_r), dim=-1)
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        dqk = self.d_n + self.d_r
        # The fused CPU SDPA kernel needs equal q/k/v head dims; zero-pad v and drop the pad after.
        v = F.pad(v, (0, dqk - self.d_v)) if self.d_v < dqk else v
        mask = self._dense_mask(ctx, T, S, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(compute), k.transpose(1, 2).to(compute), v.transpose(1, 2).to(compute),
            attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out.transpose(1, 2)[..., : self.d_v]

    def _dense_absorbed(self, q_n, q_r, latent, ctx):
        B, T, H, _ = q_n.shape
        S = latent.shape[1]
        w_uk, w_uv = self.absorbed_weights()
        compute = torch.float32 if latent.device.type == "cpu" else latent.dtype
        q_abs = torch.einsum("bthd,hdr->bthr", q_n.to(compute), w_uk.to(compute))
        q = torch.cat((q_abs, q_r.to(compute)), dim=-1).transpose(1, 2)       # (B, H, T, C)
        kv = latent.to(compute)[:, None]                                       # (B, 1, S, C)
        mask = self._dense_mask(ctx, T, S, q.device)
        if T == 1:
            # Decode: one latent head shared by all heads, so the heads are the queries of a
            # single-head attention (B, 1, H, C) -- one pass over the cache instead of H, and
            # the (B, 1, 1, S) mask broadcasts over them.
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kv, kv, attn_mask=mask,
                                               scale=self.scale)                   # (B, 1, H, C)
            return torch.einsum("bthr,hvr->bthv", o[..., : self.r], w_uv.to(compute))
        # Values are the whole latent row so q/k/v dims match (fused kernel); keep the c_kv part.
        o = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=True)
        o = o.transpose(1, 2)[..., : self.r]
        return torch.einsum("bthr,hvr->bthv", o, w_uv.to(compute))


def _check_replay(replay: torch.Tensor, layer: int, B: int, T: int) -> None:
    if not isinstance(replay, torch.Tensor) or replay.dim() != 3 or replay.shape[:2] != (B, T) \
            or replay.shape[2] < 1 or replay.dtype.is_floating_point or replay.dtype.is_complex \
            or replay.dtype == torch.bool:
        what = (f"{replay.dtype} tensor of shape {tuple(replay.shape)}" if isinstance(replay, torch.Tensor)
                else type(replay).__name__)
        raise ValueError(f"replay_indices[{layer}] must be an integer tensor of shape (B={B}, T={T}, K >= 1) "
                         f"(key slots, -1 = empty), got a {what}")


def _with_replay(fresh: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
    """The replayed key slots, except in rows that are all -1 (nothing recorded: the fresh
    selection). fresh (B, T, K_f) int64, replay (B, T, K_r) -> (B, T, max(K_f, K_r)) int64,
    -1 padded. No host sync: both are computed and merged per row."""
    replay = replay.to(device=fresh.device, dtype=torch.long)
    free = (replay < 0).all(dim=-1, keepdim=True)                        # (B, T, 1)
    K = max(fresh.shape[-1], replay.shape[-1])
    fresh = F.pad(fresh, (0, K - fresh.shape[-1]), value=-1)
    replay = F.pad(replay, (0, K - replay.shape[-1]), value=-1)
    return torch.where(free, fresh, replay)
