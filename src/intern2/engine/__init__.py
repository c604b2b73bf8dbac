"""Task-agnostic training engine: one process or many (torchrun), DDP or FSDP2, exact resume."""
from .trainer import Task, TrainConfig, Trainer

__all__ = ["Task", "TrainConfig", "Trainer"]
