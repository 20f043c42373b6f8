"""Memory layout of kernel inputs."""

from __future__ import annotations

import torch


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its last dim is contiguous, else a contiguous copy. The kernels read kv and
    the indexer keys through their batch and row strides, so a (B, S, C) view of a preallocated
    (B, S_max, C) cache -- not contiguous when B > 1 -- is used in place: `.contiguous()` would
    copy the whole cache on every decode step."""
    return x if x.stride(-1) == 1 else x.contiguous()
