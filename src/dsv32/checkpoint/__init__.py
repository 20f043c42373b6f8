"""Checkpoint I/O in the Hugging Face DeepSeek-V3.2 layout (safetensors only)."""

from .hf import (CheckpointError, convert_checkpoint, load_pretrained, read_hf_tensors, save_pretrained,
                 write_checkpoint)
from .keymap import dsv32_to_hf, hf_state_items, hf_to_dsv32

__all__ = ["CheckpointError", "convert_checkpoint", "dsv32_to_hf", "hf_state_items", "hf_to_dsv32",
           "load_pretrained", "read_hf_tensors", "save_pretrained", "write_checkpoint"]
