"""What both model families share: DeepSeek-V3.2 (transformer.py: MLA + DSA, MoE, MTP) and the
dense grouped-query-attention decoders DSA is retrofitted onto (gqa.py: Llama, Qwen, Mistral).

* `ModelOutput`, what a forward returns;
* `PreNormBlock`, the residual block `x + attn(norm(x))`, then `x + mlp(norm(x))`, and the
  `run_on_attention` entry FSDP2 gathers parameters for (distributed.shard_model);
* `CausalLM`, the model around the blocks: one forward contract,
  `forward(ids, mask, pos, *, cache, attention, records, compute_mtp, logits_to_keep,
  return_hidden) -> ModelOutput`, the MTP chain, the input check and the parameter count.

`CausalLM` builds the shell under the Hugging Face names (`model.embed_tokens`, `model.layers`,
`model.norm`, `lm_head`) from the family's block and RoPE module; a family adds its MTP layers
(`mtp`, taking `(h, emb, ctx)`; empty where it has none). Left out: everything a family does its
own way (attention, MLP or MoE, initialisation, cache, checkpoint layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .context import AttentionOptions, ForwardContext, Records, call_geometry, check_token_inputs
from .norms import RMSNorm


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


class PreNormBlock(nn.Module):
    """A decoder block: `input_layernorm`, `self_attn(x, ctx)`, `post_attention_layernorm` and
    `mlp(x, ctx, layer_idx)`; the family's subclass builds the attention and the MLP."""

    def __init__(self, cfg: Any, layer_idx: int, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

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


@torch.no_grad()
def init_module_(module: nn.Module, std: float, generator: torch.Generator | None) -> bool:
    """The start both families give their plain modules: N(0, std) for linear and embedding
    weights, zero biases, norms reset (weight 1, bias 0). False for any other module (the
    family's own, e.g. MoE experts), which the caller initialises."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std, generator=generator)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
        return True
    if isinstance(module, (RMSNorm, nn.LayerNorm)):
        module.reset_parameters()
        return True
    return False


class Decoder(nn.Module):
    """The Hugging Face `model.` prefix: `embed_tokens`, one `block(cfg, i)` per layer, `norm`."""

    def __init__(self, cfg: Any, block: Callable[[Any, int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The causal LM around a family's blocks: `block(cfg, i)` builds layer i, `rotary` maps
    positions to RoPE tables; a family with MTP layers puts them in `self.mtp`."""

    def __init__(self, cfg: Any, block: Callable[[Any, int], nn.Module], rotary: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg, block)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList()
        self.rotary = rotary
        self.attention = AttentionOptions()
        self.activation_checkpointing = False          # recompute blocks in the backward (the trainer sets it)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after `to_empty`,
        which gives each module its own storage)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        cache           the family's cache (`dsv32.inference.cache`, `.gqa_cache`); the new
                        tokens are appended.
        attention       AttentionOptions for this call (default: `self.attention`).
        records         what the layers (main and MTP) should record or replay (`Records`);
                        returned as `.records`, its results also as `.routing`, `.indices`,
                        `.expert_load` and (summed) `.aux_loss`.
        compute_mtp     also run the MTP modules (`.mtp_logits`; nothing for a family without).
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
        # Recompute each block in the backward pass instead of keeping its activations (set by
        # the trainer). Safe because blocks record their outputs into the context by layer index.
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

    def layer(self, idx: int) -> PreNormBlock:
        """The decoder block with layer index `idx`: main layers first, then MTP layers
        (`num_hidden_layers + i`), the numbering `Records` uses."""
        n = len(self.model.layers)
        return self.model.layers[idx] if idx < n else self.mtp[idx - n]

    def num_parameters(self, exclude_mtp: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_mtp and n.startswith("mtp.")))
