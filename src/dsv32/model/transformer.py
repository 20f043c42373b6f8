"""The DeepSeek-V3.2 causal LM: embeddings, decoder blocks (MLA+DSA, then a dense MLP for the
first `first_k_dense_replace` layers and DeepSeekMoE after), final norm, LM head, and the
optional multi-token-prediction (MTP) modules.

Module names mirror the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_a_proj`, ...),
so the key map (checkpoint/keymap.py) only has to split the stacked expert weights and move
the MTP layers (`model.layers.{num_hidden_layers + i}` on disk, `mtp.{i}` here).

MTP (DeepSeek-V3 §2.2): for depth 1, position i combines the main model's final hidden state
h_i with the embedding of token i+1, `eh_proj([enorm(emb) ; hnorm(h)])`, runs one more
decoder block and predicts token i+2 with the shared LM head after `shared_head.norm`. As in
vLLM/SGLang, h is taken after the main model's final norm. Only depth 1 is chained here;
deeper MTP stacks chain the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import MLA
from .context import AttentionOptions, ForwardContext
from .moe import MLP, MoE, Experts, Router
from .norms import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                                   # (B, T, V) (or the kept tail)
    hidden: torch.Tensor | None = None                     # (B, T, D) after the final norm
    routing: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> (B, T, k)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> (B, T, width)
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (E,)
    aux_loss: torch.Tensor | None = None                   # summed sequence-balance losses
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V)
    context: ForwardContext | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx, self.layer_idx)


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.shared_head.norm(super().forward(x, ctx))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DSV32ForCausalLM(nn.Module):
    """DeepSeek-V3.2 causal LM. `forward` returns a `ModelOutput`; see its arguments."""

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i)
                                 for i in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.attention = AttentionOptions()
        # Recompute each block in the backward pass instead of keeping its activations (set by
        # the trainer). Safe because blocks record their outputs into the context by layer index.
        self.activation_checkpointing = False
        if init:
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    p.normal_(0.0, std, generator=gen)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=gen)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        cache: Any = None,
        attention: AttentionOptions | None = None,
        routing: dict[int, torch.Tensor] | None = None,
        record_routing: bool = False,
        return_indices: bool = False,
        return_hidden: bool = False,
        compute_mtp: bool = False,
        balance_alpha: float = 0.0,
        logits_to_keep: int = 0,
        keep_indexer_inputs: bool = False,
    ) -> ModelOutput:
        """
        input_ids       (B, T) token ids.
        attention_mask  (B, T) 1 = real token, 0 = padding (left padding expected for batches
                        of prompts); with a cache it covers only the new tokens.
        position_ids    (B, T) RoPE positions; default counts real tokens (so a left-padded
                        row gets the positions it would have alone).
        cache           a latent cache (dsv32.inference.cache); the new tokens are appended.
        attention       AttentionOptions for this call (default: `self.attention`).
        routing         {layer: (B, T, top_k) expert ids} to replay instead of routing.
        record_routing  return the chosen expert ids per MoE layer in `.routing`.
        return_indices  return the selected key slots per layer in `.indices`.
        compute_mtp     also run the MTP modules (`.mtp_logits`).
        balance_alpha   weight of the sequence-wise balance loss (`.aux_loss`), 0 = off.
        logits_to_keep  compute logits for the last n positions only (0 = all).
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty (sequence length 0)")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        q_start = cache.length if cache is not None else 0
        new_valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if new_valid is not None and new_valid.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(new_valid.shape)}")
        past_valid = cache.key_valid if cache is not None else None
        if new_valid is None and past_valid is None:
            key_valid = None
        else:
            nv = new_valid if new_valid is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            pv = past_valid if past_valid is not None else torch.ones(B, q_start, dtype=torch.bool,
                                                                      device=input_ids.device)
            key_valid = torch.cat((pv, nv), dim=1)
        if position_ids is None:
            if key_valid is None:
                position_ids = torch.arange(q_start, q_start + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
        if int(position_ids.max()) >= cfg.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if cache is not None:
            cache.begin(B, T, new_valid)

        cos, sin = self.rotary(position_ids)
        ctx = ForwardContext(cos=cos, sin=sin, key_valid=key_valid, q_start=q_start,
                             attention=attention or self.attention, cache=cache,
                             replay_routing=routing, record_routing=record_routing,
                             return_indices=return_indices, balance_alpha=balance_alpha,
                             keep_indexer_inputs=keep_indexer_inputs)
        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            x = checkpoint(layer, x, ctx, use_reentrant=False) if recompute else layer(x, ctx)
        hidden = self.model.norm(x)
        if cache is not None:
            cache.commit(T)

        head_in = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        out = ModelOutput(logits=self.lm_head(head_in), hidden=hidden if return_hidden else None,
                          routing=ctx.routing, indices=ctx.indices, expert_load=ctx.expert_load,
                          context=ctx)
        if ctx.balance_loss:
            out.aux_loss = torch.stack(list(ctx.balance_loss.values())).sum()
        if compute_mtp and len(self.mtp):
            out.mtp_logits = self._mtp(hidden, input_ids, position_ids, key_valid if cache is None else None,
                                       ctx)
        return out

    def _mtp(self, hidden, input_ids, position_ids, key_valid, main_ctx) -> list[torch.Tensor]:
        logits = []
        h = hidden
        for depth, layer in enumerate(self.mtp, start=1):
            if h.shape[1] <= 1:
                break
            pos = position_ids[:, depth:]
            cos, sin = self.rotary(pos)
            valid = None if key_valid is None else key_valid[:, depth:]
            ctx = ForwardContext(cos=cos, sin=sin, key_valid=valid, q_start=0, attention=main_ctx.attention,
                                 balance_alpha=main_ctx.balance_alpha, return_indices=main_ctx.return_indices,
                                 keep_indexer_inputs=main_ctx.keep_indexer_inputs)
            h = layer(h[:, :-1], self.model.embed_tokens(input_ids[:, depth:]), ctx)
            logits.append(self.lm_head(h))
            main_ctx.indexer_inputs.update(ctx.indexer_inputs)     # with their depth-shifted geometry
            main_ctx.indices.update(ctx.indices)
        return logits

    # ------------------------------------------------------------------ conveniences
    def num_parameters(self, exclude_mtp: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_mtp and n.startswith("mtp.")))

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Write the Hugging Face layout (config.json + safetensors); see checkpoint.save_pretrained."""
        from ..checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "DSV32ForCausalLM":
        from ..checkpoint import load_pretrained
        return load_pretrained(path, **kwargs)
