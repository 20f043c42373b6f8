"""Data-parallel training under torchrun: FSDP2 sharding and DCP checkpoints.

    torchrun --nproc_per_node=2 -m dsv32 pretrain --config pretrain.json

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts
a process group (gloo on CPU, NCCL on CUDA); a plain `python -m dsv32 ...` stays single
process. `shard_model` applies FSDP2 (`torch.distributed.fsdp.fully_shard`) to every decoder
block and MTP layer, then to the root, so each rank holds 1/N of the weights and optimizer
state. Every rank draws the same *global* batch from the data source and keeps its own
contiguous slice (`local_batch`), so the data position is one number that means the same at
any world size, and the gradient FSDP2 averages over ranks equals the gradient of the global
batch's mean loss.

Checkpoints of sharded runs (DCP shards per rank, or the full state gathered to rank 0) are
written by `checkpointing.CheckpointFolder`; both resume at any world size. Nothing here depends
on the model family: a DeepSeek-V3.2 model and a dense GQA model retrofitted with DSA
(model/gqa.py) shard, gather and save through the same calls (the gathered state is written by
the model's own `save_pretrained(path, state_dict=...)`, each in its own Hugging Face layout).

Left out: tensor, expert and pipeline parallelism, and multi-node launch details beyond what
torchrun provides.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .model import DSV32ForCausalLM
from .model.gqa import GQAForCausalLM

CausalLM = DSV32ForCausalLM | GQAForCausalLM


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_model(model: CausalLM) -> CausalLM:
    """FSDP2: one sharding unit per decoder block and MTP layer, plus the root (embeddings,
    final norm, LM head). `Block.run_on_attention` is registered as a second forward method of
    every block, so the DSA losses, which call a layer's indexer after the model's forward,
    see gathered parameters and have their gradients reduce-scattered (see that method).
    Either model family: both keep their blocks in `model.layers` and `mtp` (empty for a dense
    GQA model), and each block has `run_on_attention`."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in list(model.model.layers) + list(model.mtp):
        fully_shard(block)
        register_fsdp_forward_method(block, "run_on_attention")
    fully_shard(model)
    return model


def settle_sharded_parameters(model: torch.nn.Module) -> None:
    """Put an FSDP2 root back in its sharded state. FSDP2 keeps the root's parameters unsharded
    after a forward (the backward would gather them again at once), so `model.parameters()`
    taken after an evaluation forward names transient tensors that never get a gradient. Call
    this before collecting parameters for an optimizer or a gradient norm; no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.reshard()


def local_batch(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (rows divisible by world size)."""
    if not info.enabled:
        return batch
    if batch.shape[0] % info.world_size:
        raise ValueError(f"batch_size {batch.shape[0]} must be divisible by the world size {info.world_size}")
    return batch.chunk(info.world_size)[info.rank]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def single_process_dcp(info: DistInfo):
    """DCP warns when used without a process group; on one process that is what we mean."""
    with warnings.catch_warnings():
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
