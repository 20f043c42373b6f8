"""The DeepSeek-V3.2 model: MLA + DeepSeek Sparse Attention + DeepSeekMoE (+ MTP)."""

from .context import AttentionOptions, ForwardContext, IndexerInputs, Records
from .causal_lm import ModelOutput
from .transformer import DSV32ForCausalLM

__all__ = ["AttentionOptions", "DSV32ForCausalLM", "ForwardContext", "IndexerInputs", "ModelOutput", "Records"]
