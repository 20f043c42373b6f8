"""Inference: the latent KV cache, prefill/decode and generation."""

from .cache import LatentCache

__all__ = ["LatentCache"]
