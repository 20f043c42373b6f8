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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .causal_lm import CausalLM, PreNormBlock, init_module_
from .context import ForwardContext
from .moe import MLP, MoE, Experts, Router
from .norms import RMSNorm
from .rope import RotaryEmbedding


class Block(PreNormBlock):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, MLA(cfg, layer_idx),
                         MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size))


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


class DSV32ForCausalLM(CausalLM):
    """DeepSeek-V3.2 causal LM. `forward` (causal_lm.CausalLM) returns a `ModelOutput`."""

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__(cfg, Block, RotaryEmbedding(cfg))
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i)
                                 for i in range(cfg.num_nextn_predict_layers))
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
            if init_module_(module, std, gen):
                continue
            if isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    p.normal_(0.0, std, generator=gen)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=gen)
                module.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ conveniences
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Write the Hugging Face layout (config.json + safetensors); see checkpoint.save_pretrained."""
        from ..checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "DSV32ForCausalLM":
        from ..checkpoint import load_pretrained
        return load_pretrained(path, **kwargs)
