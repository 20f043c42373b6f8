"""RMSNorm, computed in float32 whatever the input dtype (as both reference implementations do),
and the float32-pinned modules (router, indexer head weights)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Float32Params(nn.Module):
    """A module whose own parameters and buffers stay float32 under `.to(dtype)`: the MoE router
    and the indexer's head weights, which both reference implementations keep in float32."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in list(self.parameters(recurse=False)) + list(self.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self


class Float32Linear(Float32Params, nn.Linear):
    """nn.Linear pinned to float32 (see Float32Params)."""
