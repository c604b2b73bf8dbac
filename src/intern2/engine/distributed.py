"""Process-group helpers for torchrun (env:// rendezvous): gloo on CPU, nccl on GPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_mean", "fully_shard_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick the device ('auto', 'cpu', 'cuda')."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {device!r} asked for, but torch sees no CUDA device here (use 'cpu' or "
                         f"'auto')")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo",
                                device_id=torch_device if torch_device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, torch_device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def fully_shard_model(model: nn.Module, mp_policy: Optional["torch.distributed.fsdp.MixedPrecisionPolicy"] = None
                      ) -> List[nn.Parameter]:
    """Shard ``model`` in place with FSDP2: each of its ``fsdp_units()`` (e.g. one per residual block) is a unit,
    the root holds the rest. Returns the parameters left whole on every rank: ``fully_shard`` cannot shard 0-d
    parameters (CLIP's logit_scale), so their gradients must be averaged by the caller."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = mp_policy or MixedPrecisionPolicy()
    replicated = [p for p in model.parameters() if p.dim() == 0]
    ignored = set(replicated) or None
    for module in getattr(model, "fsdp_units", lambda: [])():
        fully_shard(module, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    return replicated
