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

`DCPCheckpointer` has the `Checkpointer` interface of checkpointing.py and writes
`torch.distributed.checkpoint` folders: each rank writes its shards, rank 0 adds the trainer
state and renames the folder into place once every rank is done, so a killed run keeps its
previous checkpoint. DCP re-shards on load, so a checkpoint written at world size 2 resumes
at world size 1 (or 4) unchanged.

Left out: tensor, expert and pipeline parallelism, and multi-node launch details beyond what
torchrun provides.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..model import DSV32ForCausalLM
from .checkpointing import STATE_NAME, CheckpointFolder, config_differences

DCP_DIR = "dcp"


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


def shard_model(model: DSV32ForCausalLM) -> DSV32ForCausalLM:
    """FSDP2: one sharding unit per decoder block and MTP layer, plus the root (embeddings,
    final norm, LM head). `Block.run_on_attention` is registered as a second forward method of
    every block, so the DSA losses, which call a layer's indexer after the model's forward,
    see gathered parameters and have their gradients reduce-scattered (see that method)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in list(model.model.layers) + list(model.mtp):
        fully_shard(block)
        register_fsdp_forward_method(block, "run_on_attention")
    fully_shard(model)
    return model


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
def _single_process_ok(info: DistInfo):
    """DCP warns when used without a process group; on one process that is what we mean."""
    with warnings.catch_warnings():
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class DCPCheckpointer(CheckpointFolder):
    """Sharded checkpoints with torch.distributed.checkpoint (see the module docstring).

    Layout: checkpoint-XXXXXXXX/{config.json, model.safetensors (the gathered model, HF layout),
    trainer_state.pt, dcp/ (model + optimizer shards, what resume reads)}.
    Works at world size 1 too (a plain model), which is how a sharded run's checkpoint is
    resumed on a single process."""

    def __init__(self, root: str | Path, info: DistInfo, *, keep: int = 1) -> None:
        super().__init__(root, keep=keep)
        self.info = info

    def save(self, step: int, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        final, tmp = self.paths(step)
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clear_partial()
            tmp.mkdir()
        barrier(self.info)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_ok(self.info):
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        # Also the full model in the HF layout (gathered on rank 0), so that a run folder loads with
        # `load_pretrained` whatever world size wrote it.
        save_full_model(model, tmp, self.info)
        if self.info.is_main:
            torch.save(state, tmp / STATE_NAME)
            os.replace(tmp, final)
            self.prune(final)
        barrier(self.info)
        return final

    def load(self, path: Path, model: DSV32ForCausalLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        path = Path(path)
        if not (path / STATE_NAME).is_file() or not (path / DCP_DIR).is_dir():
            raise ValueError(f"{path} is not a sharded training checkpoint (it needs {STATE_NAME} and {DCP_DIR}/)")
        diff = config_differences(ModelConfig.from_hf_config(path / "config.json"), model.config)
        if diff:
            raise ValueError(f"checkpoint {path} was made with another model config ({'; '.join(diff)}; "
                             f"checkpoint vs now); resume with the same settings or start a new run")
        from torch.distributed.checkpoint import DefaultLoadPlanner
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optimizer": optim_sd}
        # Partial: parameters that never received a gradient (the indexer under an LM loss)
        # have no optimizer state in the checkpoint, and need none.
        with _single_process_ok(self.info):
            dcp.load(target, checkpoint_id=str(path / DCP_DIR), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)


def save_full_model(model: DSV32ForCausalLM, path: str | Path, info: DistInfo) -> None:
    """Gather a sharded model's full weights on rank 0 and write the HF layout there."""
    if not info.enabled:
        model.save_pretrained(path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from ..checkpoint import write_checkpoint
    from ..checkpoint.keymap import hf_state_items
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        write_checkpoint(hf_state_items(full, model.config), model.config, path)
    barrier(info)


def checkpointer_for(root: str | Path, info: DistInfo, *, keep: int = 1):
    """DCP checkpoints under torchrun, or when the run folder already holds DCP checkpoints (a
    sharded run resumed on one process); plain local checkpoints otherwise."""
    from .checkpointing import LocalCheckpointer
    dcp_ckpt = DCPCheckpointer(root, info, keep=keep)
    latest = dcp_ckpt.latest()
    if info.enabled or (latest is not None and (latest / DCP_DIR).is_dir()):
        return dcp_ckpt
    return LocalCheckpointer(root, keep=keep)
