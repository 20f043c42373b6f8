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
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import MLA
from .context import AttentionOptions, ForwardContext, Records, call_geometry, check_token_inputs
from .moe import MLP, MoE, Experts, Router
from .norms import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                                   # (B, T, V) (or the kept tail)
    hidden: torch.Tensor | None = None                     # (B, T, D) after the final norm
    records: Records = field(default_factory=Records)      # what the layers recorded
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V)

    @property
    def routing(self) -> dict[int, torch.Tensor]:          # layer -> (B, T, top_k) expert ids
        return self.records.routing

    @property
    def indices(self) -> dict[int, torch.Tensor]:          # layer -> (B, T, K) selected key slots
        return self.records.indices

    @property
    def expert_load(self) -> dict[int, torch.Tensor]:      # layer -> (E,) token counts
        return self.records.expert_load

    @property
    def aux_loss(self) -> torch.Tensor | None:             # summed sequence-balance losses, MTP included
        losses = self.records.balance_loss
        return torch.stack(list(losses.values())).sum() if losses else None


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

    def run_on_attention(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(self.self_attn, *args)`, run as a forward of this block.

        The DSA losses train each indexer on inputs the model's forward kept, after that forward
        returned. Under FSDP2 the block's parameters are sharded DTensors between forwards, so
        `shard_model` registers this method with `register_fsdp_forward_method`: FSDP gathers
        the parameters for the call and reduce-scatters the gradients of what it returns exactly
        as for `forward`. Without FSDP it is a plain call."""
        return fn(self.self_attn, *args)


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
        records: Records | None = None,
        compute_mtp: bool = False,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """
        input_ids       (B, T) token ids.
        attention_mask  (B, T) 1 = real token, 0 = padding (left padding expected for batches
                        of prompts); with a cache it covers only the new tokens.
        position_ids    (B, T) RoPE positions; default counts real tokens (so a left-padded
                        row gets the positions it would have alone).
        cache           a latent cache (dsv32.inference.cache); the new tokens are appended.
        attention       AttentionOptions for this call (default: `self.attention`).
        records         what the layers (main and MTP) should record or replay (`Records`);
                        returned as `.records`, its results also as `.routing`, `.indices`,
                        `.expert_load` and (summed) `.aux_loss`.
        compute_mtp     also run the MTP modules (`.mtp_logits`).
        logits_to_keep  compute logits for the last n positions only (0 = all).
        return_hidden   also return the final normed hidden states (`.hidden`).

        No host synchronisation happens here: token ranges and positions are checked where
        inputs enter (`check_inputs`, called by generate, the trainer and the CLI).
        """
        q_start, new_valid, key_valid, position_ids = call_geometry(input_ids, attention_mask, position_ids, cache)
        B, T = input_ids.shape
        records = records if records is not None else Records()
        if cache is not None:
            cache.begin(B, T, new_valid)

        cos, sin = self.rotary(position_ids)
        ctx = ForwardContext(cos=cos, sin=sin, key_valid=key_valid, q_start=q_start,
                             attention=attention or self.attention, cache=cache, records=records)
        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            x = checkpoint(layer, x, ctx, use_reentrant=False) if recompute else layer(x, ctx)
        hidden = self.model.norm(x)
        if cache is not None:
            cache.commit(T)

        head_in = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        out = ModelOutput(logits=self.lm_head(head_in), hidden=hidden if return_hidden else None,
                          records=records)
        if compute_mtp and len(self.mtp):
            out.mtp_logits = self._mtp(hidden, input_ids, position_ids, key_valid if cache is None else None,
                                       ctx, recompute)
        return out

    def _mtp(self, hidden, input_ids, position_ids, key_valid, main_ctx, recompute) -> list[torch.Tensor]:
        """The MTP modules, each on the sequence shifted by its depth, with its own RoPE tables and
        key mask, recording into the caller's `Records` like the main layers."""
        logits = []
        h = hidden
        for depth, layer in enumerate(self.mtp, start=1):
            if h.shape[1] <= 1:
                break
            cos, sin = self.rotary(position_ids[:, depth:])
            valid = None if key_valid is None else key_valid[:, depth:]
            ctx = ForwardContext(cos=cos, sin=sin, key_valid=valid, q_start=0, attention=main_ctx.attention,
                                 records=main_ctx.records)
            emb = self.model.embed_tokens(input_ids[:, depth:])
            h = (checkpoint(layer, h[:, :-1], emb, ctx, use_reentrant=False) if recompute
                 else layer(h[:, :-1], emb, ctx))
            logits.append(self.lm_head(h))
        return logits

    def check_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        """`context.check_token_inputs` against this model's config (synchronises; call where
        inputs enter: generate, the trainer, the CLI)."""
        check_token_inputs(self.config, input_ids, position_ids)

    def layer(self, idx: int) -> Block:
        """The decoder block with layer index `idx`: main layers first, then MTP layers
        (`num_hidden_layers + i`), the numbering `Records` uses."""
        n = len(self.model.layers)
        return self.model.layers[idx] if idx < n else self.mtp[idx - n]

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
