"""AdamW parameter groups (no decay on 1-D tensors, layer-wise lr decay) and the lr schedules (warmup + cosine,
warmup + inverse square root)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "warmup_cosine", "inverse_sqrt", "lr_schedule", "stretch_to_time",
           "SCHEDULES"]

SCHEDULES = ("cosine", "inverse_sqrt")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[Dict]:
    """Groups keyed by (decay or not, lr scale).

    Biases, norm weights, layer-scale gammas (every tensor with ndim <= 1) and names in
    ``model.no_weight_decay()`` get no weight decay. With ``layer_decay``, a model exposing
    ``layer_id(name) -> int`` and ``num_layer_ids`` gets lr scale ``layer_decay ** (num_layer_ids - 1 - id)``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    use_layer_decay = layer_decay is not None and layer_decay != 1.0
    if use_layer_decay and not hasattr(model, "layer_id"):  # silently training without it would mislead
        raise ValueError(f"train.layer_decay: {type(model).__name__} has no layer depths to decay over (InternImage "
                         f"classifiers, UperNet and the video ViTs have); leave it unset")
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name in skip else weight_decay
        scale = layer_decay ** (model.num_layer_ids - 1 - model.layer_id(name)) if use_layer_decay else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    layer_decay: Optional[float] = None) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0 to 1, then cosine to ``min_lr_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def inverse_sqrt(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier of the Transformer / fairseq translation recipe: linear warmup to 1, then
    ``sqrt(warmup_steps / step)`` (no end point, so training can go on)."""
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        step += 1
        return step / warmup if step < warmup else math.sqrt(warmup / step)
    return factor


def lr_schedule(name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The multiplier function of schedule ``name`` (one of :data:`SCHEDULES`)."""
    if name == "inverse_sqrt":
        return inverse_sqrt(warmup_steps)
    if name == "cosine":
        return warmup_cosine(total_steps, warmup_steps, min_lr_ratio)
    raise ValueError(f"unknown lr schedule {name!r}; expected one of {SCHEDULES}")


def stretch_to_time(factor: Callable[[int], float], total_steps: int, warmup_steps: int,
                    time_fraction: Callable[[], float]) -> Callable[[int], float]:
    """``factor`` for a run that ends on a time budget rather than a step count: after warmup the schedule
    advances with whichever is further along, the steps or ``time_fraction()`` of the budget, so a cosine decays
    fully by the time the budget runs out."""
    def stretched(step: int) -> float:
        if step < warmup_steps:
            return factor(step)
        by_time = warmup_steps + round(min(1.0, time_fraction()) * (total_steps - warmup_steps))
        return factor(max(step, by_time))
    return stretched
