"""Weight layout for batch-1 decode: `decode_layout(model)` re-lays the linear weights in place.

At batch 1 every projection is a matrix-vector product, bound by reading its weight once.
On CPU (one thread, CPU clock, the 50 MB `wq_b` of the indexer) `F.linear` of one row read an
(out, in) row-major weight at 13-20 GB/s in our runs, and the same values stored column-major
-- the storage of W^T, viewed back as W -- at 15-26 GB/s, 13-30% less time; the 151 MB
`q_b_proj` of V3.2 11.1 -> 8.4 ms. Prefill GEMMs (512 and 2048 rows) took 0.94-1.02x the
row-major time, forward + backward 1.02-1.05x (`benchmarks/bench_layout.py`): hence a step for
inference, not the layout the model is built with.

The re-layout keeps every parameter's shape, values, dtype, device and identity (optimizers,
state_dict keys and tied references still see the same tensor); only strides change, and
`load_state_dict` copies into the new layout. Nothing is duplicated: each weight's storage
is swapped for one of the same size (one weight at a time is held twice while it is copied). Saving as safetensors writes contiguous copies
(`checkpoint.hf`).

Left alone, on purpose:
* weights read through reshaped views (MLA's `kv_b_proj`, split per head into W_uk and W_uv
  by `.view`): its batched per-head products measured 1.4-18x slower on column-major storage;
* a weight shared with an embedding (tied `lm_head`): row lookups want rows contiguous;
* the MoE experts (3-D parameters in batched products) and anything that is not `nn.Linear`.

It is an explicit step for inference-only use (the CLI's `generate` applies it); generation
inside training (GRPO rollouts) leaves the trained model's layout as it is.
"""

from __future__ import annotations

import torch
from torch import nn

_PER_HEAD_VIEWS = ("kv_b_proj",)        # module names whose weight is reshaped per head


@torch.no_grad()
def decode_layout(model: nn.Module) -> nn.Module:
    """Store each eligible `nn.Linear` weight of `model` column-major, in place; returns `model`.
    Idempotent; values, shapes and parameter objects are unchanged."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in _PER_HEAD_VIEWS:
            continue
        w = module.weight
        if id(w) in embedded or is_column_major(w):
            continue
        w.data = w.data.t().contiguous().t()
    return model


def is_column_major(w: torch.Tensor) -> bool:
    """True when the 2-D `w` is stored as the contiguous transpose of itself."""
    return w.dim() == 2 and w.t().is_contiguous()
