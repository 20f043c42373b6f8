"""dsv32: DeepSeek-V3.2-style models in PyTorch.

    from dsv32 import ModelConfig, DSV32ForCausalLM, load_pretrained
"""

from .config import ModelConfig
from .model import AttentionOptions, DSV32ForCausalLM, ModelOutput, Records


def load_pretrained(path, **kwargs):
    """Load a Hugging Face-layout DeepSeek-V3.2 checkpoint; see dsv32.checkpoint.load_pretrained."""
    from .checkpoint import load_pretrained as _load
    return _load(path, **kwargs)


__all__ = ["AttentionOptions", "DSV32ForCausalLM", "ModelConfig", "ModelOutput", "Records", "load_pretrained"]
__version__ = "0.1.0"
