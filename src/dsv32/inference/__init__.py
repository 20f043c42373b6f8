"""Inference: the latent KV cache, sampling, and batched generation with RL records."""

from .cache import LatentCache, StaticLatentCache
from .generate import GenerationResult, generate, left_pad
from .layout import decode_layout
from .sampling import Sample, SamplingParams, kept_mask, sample_next

__all__ = ["GenerationResult", "LatentCache", "Sample", "SamplingParams", "StaticLatentCache", "decode_layout", "generate",
           "kept_mask", "left_pad", "sample_next"]
