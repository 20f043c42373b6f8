"""A dense grouped-query-attention decoder (the Llama / Qwen2 / Qwen3 / Mistral block), dsv32's own
implementation, so that DSA can be retrofitted onto checkpoints people already have.

Shape legend: B batch, T queries, S keys (cache + new), H query heads, G kv heads (groups),
d head dim, D hidden size.

    q = W_q x -> (B, T, H, d)     k = W_k x, v = W_v x -> (B, T, G, d)     (+ bias: Qwen2)
    q, k = RMSNorm_d(q), RMSNorm_d(k)                                        (Qwen3 only)
    q, k = RoPE_half(q), RoPE_half(k)       the model's own frequencies (rope.py layout "half")
    head h reads kv group h // (H / G)
    block: x + attn(RMSNorm(x)); x + W_down(silu(W_gate x) * W_up x) on RMSNorm(x)

Module names are the Hugging Face ones (`model.layers.{i}.self_attn.q_proj`, ...), so the key
map is the identity (checkpoint/hf_dense.py). The model shell, the block and the forward are
the ones DSV32ForCausalLM uses (model/causal_lm.py): `forward(ids, mask, pos, *, cache,
attention, records, ...) -> ModelOutput`, left padding and positions counting real tokens
included; this file holds what the dense families do their own way (attention, RoPE, init).
Sliding-window layers (Mistral, Qwen with `use_sliding_window`) mask keys more than
`sliding_window - 1` slots back.

With an indexer configured (`DenseConfig.indexer`), each non-dense layer owns a `GQAIndexer`
(model/gqa_indexer.py) and, under `AttentionOptions(sparse=True)`, attends only to the top-k
key slots it selects (kernels `sparse_gqa`). Left out: MTP, MoE, attention dropout.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .causal_lm import CausalLM, PreNormBlock, init_module_
from .context import ForwardContext, IndexerInputs
from .gqa_config import DenseConfig
from .gqa_indexer import GQAIndexer
from .moe import MLP
from .norms import RMSNorm
from .rope import apply_rope_half


# ------------------------------------------------------------------------------- RoPE
def dense_inv_freq(cfg: DenseConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (d/2,) float32 for RoPE types default, linear and llama3.

    llama3 (Llama 3.1): wavelengths longer than original_max / low_freq_factor are slowed by
    `factor`, shorter than original_max / high_freq_factor kept, the band between blended
    linearly in original_max / wavelength."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv / factor
    lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    blend = ((old / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)      # 0: slow by factor, 1: keep
    return inv / factor * (1 - blend) + inv * blend


class DenseRotary(nn.Module):
    """(cos, sin), each (B, T, d/2) float32, for integer positions (B, T). Frequencies are
    computed per device on first use (no buffer: a meta-built model needs no re-init)."""

    def __init__(self, cfg: DenseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.device not in self._cache:
            self._cache[positions.device] = dense_inv_freq(self.cfg, positions.device)
        angles = positions.to(torch.float32)[..., None] * self._cache[positions.device]
        return angles.cos(), angles.sin()


# ------------------------------------------------------------------------------- layers
class GQAttention(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_groups, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None
        D, H, G, d = cfg.hidden_size, self.n_heads, self.n_groups, self.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.indexer = GQAIndexer(cfg) if cfg.has_indexer(layer_idx) else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> q (B, T, H, d), k (B, T, G, d) with RoPE, v (B, T, G, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_groups, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_groups, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin), v

    @torch.no_grad()
    def mqa_form(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's attention written as one shared key head, for the DSA losses
        (training/dsa.py works on that form): keys kv (B, T, G*d) = the G groups' keys side by
        side, queries q (B, T, H, G*d) = head h's query in its group's block, zeros elsewhere,
        so q[t, h] . kv[s] = q_h(t) . k_{g(h)}(s), scaled by `self.scale`. Float32, no gradient.
        Costs G times the score FLOPs of the grouped form: fine for the losses' chunked scoring."""
        q, k, _ = self.project(x, cos, sin)
        B, T, H, d = q.shape
        G, R = self.n_groups, self.n_heads // self.n_groups
        wide = q.new_zeros(B, T, G, R, G, d, dtype=torch.float32)
        for g in range(G):
            wide[:, :, g, :, g] = q.view(B, T, G, R, d)[:, :, g].float()
        return wide.view(B, T, H, G * d), k.float().reshape(B, T, G * d)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        opts = ctx.attention
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        ix = self.indexer
        k_index = None
        if ix is not None and (opts.sparse or ctx.cache is not None):
            with torch.no_grad():
                k_index = ix.keys(x.detach(), ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v, k_index = ctx.cache.update(self.layer_idx, k, v, k_index, ctx.q_start)
        S = k.shape[1]
        rec = ctx.records
        if ix is not None and rec.keep_indexer_inputs:
            # The indexer's query latent is its own (trained) projection of x, so c_q is x itself.
            rec.indexer_inputs[self.layer_idx] = IndexerInputs(x.detach(), x.detach(), ctx.cos, ctx.sin,
                                                               ctx.key_valid)
        topk = None
        if ix is not None:
            topk = ix.spec.topk if opts.topk is None else opts.topk
        select = ix is not None and opts.sparse and not (opts.dense_shortcut and S <= topk)
        indices = None
        if ix is not None and opts.sparse and (select or rec.record_indices):
            with torch.no_grad():
                q_index, w_index = ix.queries(x.detach(), x.detach(), ctx.cos, ctx.sin)
            indices = ix.select(q_index, w_index, k_index, ctx.q_start, ctx.key_valid, opts.backend, topk)
            if rec.record_indices:
                rec.indices[self.layer_idx] = indices
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        if select:
            out, _ = kernels.sparse_gqa(q.to(compute), k.to(compute), v.to(compute), indices, self.scale,
                                        backend=opts.backend)
        else:
            out = self._dense(q.to(compute), k.to(compute), v.to(compute), ctx)
        q_valid = ctx.query_valid(T)
        if q_valid is not None:
            out = out * q_valid[:, :, None, None].to(out.dtype)      # padding queries attend to nothing
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim).to(x.dtype))

    def _dense(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """SDPA with the kv groups broadcast (enable_gqa); q (B, T, H, d), k/v (B, S, G, d)."""
        T, S = q.shape[1], k.shape[1]
        mask = None
        if ctx.key_valid is not None or ctx.q_start or T != S or self.window is not None:
            q_slots = torch.arange(ctx.q_start, ctx.q_start + T, device=q.device)
            mask = kernels.allowed_keys(S, q_slots, ctx.key_valid)
            if self.window is not None:
                s = torch.arange(S, device=q.device)
                mask = mask & (s[None, None, :] > q_slots[None, :, None] - self.window)
            # A query may always see itself, so padding rows stay finite (they are zeroed after).
            mask = (mask | (torch.arange(S, device=q.device)[None, None, :] == q_slots[None, :, None]))[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)


class GQABlock(PreNormBlock):
    def __init__(self, cfg: DenseConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, GQAttention(cfg, layer_idx),
                         MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias))


# ------------------------------------------------------------------------------- the model
class GQAForCausalLM(CausalLM):
    """A Llama / Qwen2 / Qwen3 / Mistral causal LM, optionally with DSA retrofitted. `forward`
    (causal_lm.CausalLM) is DSV32ForCausalLM's; `compute_mtp` finds no MTP layer to run."""

    def __init__(self, cfg: DenseConfig, *, init: bool = True) -> None:
        super().__init__(cfg, GQABlock, DenseRotary(cfg))          # no MTP layers in these families
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases; each
        indexer then gets its own start (GQAIndexer.reset_parameters)."""
        gen = None if seed is None else torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for module in self.modules():
            init_module_(module, self.config.initializer_range, gen)
        for layer in self.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.reset_parameters(gen, layer.self_attn)

    def new_cache(self, batch: int, max_length: int, *, kind: str = "static", fp8: bool = False):
        """The K/V (+ indexer key) cache `dsv32.inference.generate` uses for this model; both
        kinds ("static", "growing") get the preallocated `GQACache`, in FP8 with `fp8`."""
        from ..inference.gqa_cache import GQACache
        if kind not in ("static", "growing"):
            raise ValueError(f"cache must be 'static' or 'growing', got {kind!r}")
        return GQACache(self.config, batch, max_length, dtype=self.lm_head.weight.dtype,
                        device=self.lm_head.weight.device, fp8=fp8)

    def set_indexer_topk(self, topk: int) -> None:
        """Change k (in the config, so it is saved; every indexer reads it at call time)."""
        if self.config.indexer is None:
            raise ValueError("the model has no indexer; attach one first (checkpoint.hf_dense.attach_indexer)")
        spec = replace(self.config.indexer, topk=topk)
        self.config = self.config.with_indexer(spec)
        for layer in self.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.spec = spec

    def save_pretrained(self, path, **kwargs: Any):
        from ..checkpoint.hf_dense import save_dense
        return save_dense(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs: Any) -> "GQAForCausalLM":
        from ..checkpoint.hf_dense import load_dense
        return load_dense(path, **kwargs)
