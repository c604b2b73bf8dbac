"""The training loop every task shares. It knows nothing about images, video or text: a :class:`Task` supplies
the model, datasets, loss and metrics.

One process or many under ``torchrun`` (DDP, or FSDP2 ``fully_shard`` for models that do not fit), AdamW with
warmup + cosine and optional layer-wise lr decay, bf16 autocast, gradient accumulation and clipping, EMA,
atomic checkpoints with exact resume (model, optimizer, scheduler, EMA, step and position in the epoch, every
rank's RNG), JSONL metrics, and a progress bar on rank 0 at a terminal.

Exact resume rests on two choices: the epoch's sample order is a function of (seed, epoch) and can start
mid-epoch (:class:`ShardedSampler`), and datasets derive per-sample augmentation randomness from
(seed, epoch, index) (see ``intern2.data.SeededDataset``), so neither depends on worker processes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import atomic_write, check_output, remove_stale_temps
from ..config import check_range, to_dict
from .distributed import DistInfo, cleanup, fully_shard_model, init_distributed
from .optim import SCHEDULES, build_optimizer, lr_schedule, stretch_to_time

__all__ = ["Task", "TrainConfig", "Trainer", "ShardedSampler", "ModelEma", "accumulate_eval"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping; ``batch_size`` is per process (global = batch_size * world * grad_accum)."""

    epochs: int = 10
    max_steps: Optional[int] = None
    time_limit_s: Optional[float] = None  # stop after the step that passes this much training time (eval, save follow)
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # or "inverse_sqrt" (translation): warmup, then lr * sqrt(warmup_steps / step)
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = 5.0
    amp: str = "none"  # "none" or "bf16"
    ema_decay: Optional[float] = None
    freeze_bn: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    eval_every: Optional[int] = None  # optimizer steps; None: at the end of every epoch
    checkpoint_every: Optional[int] = None  # optimizer steps; None: at the end of every epoch
    out_dir: str = "runs/train"
    resume: Optional[str] = None  # a checkpoint path, or "auto": <out_dir>/checkpoints/last.pt if it exists

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"train.amp: expected 'none' or 'bf16', got {self.amp!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        positive = ("epochs", "batch_size", "grad_accum", "log_every", "max_steps", "eval_every", "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name}: expected a positive integer, got {value}")
        for name in ("warmup_steps", "num_workers", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}: expected a number >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr: expected a positive number, got {self.lr}")
        for name, interval in (("min_lr_ratio", "[0, 1]"), ("layer_decay", "(0, 1]"), ("ema_decay", "[0, 1)")):
            check_range(self, name, interval, prefix="train.")
        if self.time_limit_s is not None and not (math.isfinite(self.time_limit_s) and self.time_limit_s >= 0):
            raise ValueError(f"train.time_limit_s: expected a number >= 0 or null, got {self.time_limit_s}")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ValueError(f"train.clip_grad: expected a positive number or null, got {self.clip_grad}")


class Task(Protocol):
    """What a task plugs into the trainer."""

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def eval_dataset(self) -> Optional[Dataset]: ...

    def collate(self, samples: List[Any]) -> Any: ...

    def training_step(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(loss, scalars to log); the loss is computed in float32."""

    def eval_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        """Sums over the batch (counts, correct predictions, ...): the trainer adds them over batches and ranks."""

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Metrics from the summed eval_step outputs."""

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the final model (config + weights + whatever inference needs) into ``directory``."""


class ShardedSampler(Sampler[int]):
    """The epoch's order is a permutation seeded by (seed, epoch), split into equal per-rank shards (the remainder
    is dropped so every rank runs the same number of steps) of at most ``used`` samples (the Trainer's whole
    steps: no partial accumulation is drawn); iteration can start ``start`` samples into the shard."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 used: Optional[int] = None):
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.used = size // world_size if used is None else min(used, size // world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _shard(self) -> torch.Tensor:
        order = (torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
                 if self.shuffle else torch.arange(self.size))
        return order[self.rank::self.world_size][:self.used]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.used - self.start)


class ModelEma:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.lerp_(live.detach(), 1 - self.decay)
            else:
                ema.copy_(live)


@dataclass
class _Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in this epoch (per rank)
    elapsed_s: float = 0.0  # training seconds before this process started (a resumed run's time limit counts them)
    eval_pending: bool = False  # saved just before this step's evaluation, which a resume runs first
    evaluated: bool = False  # this step's evaluation was logged before the save


_RESUME_KEYS = frozenset({"model", "optimizer", "scheduler", "ema", "rng", "progress"})  # what _save writes


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def accumulate_eval(model: nn.Module, loader: DataLoader, eval_step, device: torch.device,
                    autocast=contextlib.nullcontext) -> Dict[str, torch.Tensor]:
    """Sum ``eval_step(model, batch)`` outputs over a loader, with the model in eval mode."""
    was_training = model.training
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    for batch in loader:
        with autocast():
            for key, value in eval_step(model, _to_device(batch, device)).items():
                sums[key] = sums.get(key, 0) + value.detach().double()
    model.train(was_training)
    return sums


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _record_key(line: str) -> Tuple[str, float]:
    """(split, step) of a metrics.jsonl line (step infinity for a line that is not a record: a torn last write)."""
    try:
        record = json.loads(line)
        return str(record.get("split")), float(record["step"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", math.inf


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train.lr": 1e-3, ...}`` from a nested config dict (lists stay values)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "model_args":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Fields a resumed run may change: its length and bookkeeping, memory (recomputation), and evaluation (which does
# not touch training); a task adds its own as ``resume_may_change`` (its initial weights, which the resume replaces).
_RESUMABLE_CHANGES = frozenset({"train.epochs", "train.max_steps", "train.time_limit_s", "train.resume",
                                "train.out_dir", "train.device", "train.num_workers", "train.log_every",
                                "train.eval_every", "train.checkpoint_every", "train.grad_checkpointing"})


def _may_change_on_resume(key: str) -> bool:
    return key in _RESUMABLE_CHANGES or key.rpartition(".")[2].startswith(("eval_", "test_"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _explain_batchnorm_error(batch_size: int):
    """Turn BatchNorm's "Expected more than 1 value per channel" into what the user can change."""
    try:
        yield
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        cause = ("train.batch_size is 1" if batch_size == 1
                 else f"all but one image of a batch of {batch_size} were unreadable")
        raise ValueError(f"train.batch_size: a BatchNorm layer was given one image's 1x1 feature map, one value "
                         f"per channel ({cause}); train with batch_size >= 2 (or larger images)") from exc


class Trainer:
    """Runs a :class:`Task` under a :class:`TrainConfig`; ``fit()`` returns the final eval metrics."""

    def __init__(self, task: Task, cfg: TrainConfig, config_to_save: Optional[Dict[str, Any]] = None):
        self.task = task
        self.cfg = cfg
        # The task's whole config (what a resume compares), with this TrainConfig.
        task_cfg = getattr(task, "cfg", None)
        whole = to_dict(task_cfg) if dataclasses.is_dataclass(task_cfg) else {}
        self.config_to_save = config_to_save or {**whole, "train": to_dict(cfg)}
        self.out_dir = Path(cfg.out_dir)
        self.dist: DistInfo = DistInfo()
        self.model: Optional[nn.Module] = None  # the trained (unwrapped) model, after fit()
        self._evaluated_at: Optional[int] = None  # the step of the last evaluation
        self._replicated: List[nn.Parameter] = []  # parameters FSDP2 leaves unsharded
        self._started = 0.0  # perf_counter() at which this run's training time would have begun
        self._saved_at: Optional[int] = None  # the step of the last checkpoint

    # --------------------------------------------------------------------------------------------------- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy
            if not dist.is_initialized():
                raise ValueError("train.fsdp needs a process group: launch with torchrun")
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.cfg.amp == "bf16" else None
            # The 0-d parameters it leaves whole get their gradients averaged by hand (_average_replicated_grads).
            self._replicated = fully_shard_model(model, policy)
            return model
        if self.dist.distributed:
            cuda = self.dist.device.type == "cuda"
            if cuda and hasattr(model, "sync_batchnorm"):  # SyncBatchNorm needs CUDA; on CPU each rank keeps its BN
                model.sync_batchnorm()
            return nn.parallel.DistributedDataParallel(model, device_ids=[self.dist.device.index] if cuda else None)
        return model

    def _loader(self, dataset: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        # A private generator: creating an iterator (every epoch, and on resume) must not draw from the global RNG.
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.cfg.num_workers, collate_fn=self.task.collate,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def _save(self, model, optimizer, scheduler, ema, progress: _Progress, eval_next: bool) -> None:
        """Checkpoint the run (every rank calls this: it gathers); ``eval_next``: an evaluation of this step
        follows, which a run resumed from this checkpoint runs first (it may not have happened)."""
        progress.elapsed_s = self._elapsed(self._started)
        progress.eval_pending, progress.evaluated = eval_next, self._evaluated_at == progress.step
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = [_rng_state()]
        if self.dist.distributed:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, _rng_state())
        if self.dist.is_main:
            payload = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                       "ema": ema.module.state_dict() if ema else None, "rng": rng,
                       "progress": dataclasses.asdict(progress),
                       "world_size": self.dist.world_size, "config": self.config_to_save}
            atomic_write(self.checkpoint_path(), lambda tmp: torch.save(payload, tmp))
            log.info("checkpoint step %d -> %s", progress.step, self.checkpoint_path())
        self._saved_at = progress.step
        if self.dist.distributed:
            dist.barrier()

    def _resume_source(self) -> Optional[Path]:
        if self.cfg.resume is None:
            return None
        if self.cfg.resume == "auto":
            return self.checkpoint_path() if self.checkpoint_path().exists() else None
        path = Path(self.cfg.resume)
        if not path.exists():
            raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
        return path

    def _load(self, path: Path, model, optimizer, scheduler, ema, progress: _Progress) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"train.resume: cannot read training checkpoint {path}: {exc}") from exc
        missing = sorted(_RESUME_KEYS - set(payload)) if isinstance(payload, dict) else None
        if missing is None or missing:
            found = f"a {type(payload).__name__}" if missing is None else f"no {missing}"
            raise ValueError(f"train.resume: {path} is not a training checkpoint (expected the {sorted(_RESUME_KEYS)} "
                             f"the Trainer writes, found {found}); to start from model weights set checkpoint=")
        self._check_same_run(path, payload.get("config"))
        if payload.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"train.resume: {path} was written by {payload['world_size']} processes, this run has "
                             f"{self.dist.world_size}; the data order would not continue exactly")
        try:
            set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as exc:  # another model's (or optimizer's) state
            raise ValueError(f"train.resume: {path} does not fit this model and optimizer: "
                             f"{str(exc).strip().splitlines()[-1][:300]}") from exc
        scheduler.load_state_dict(payload["scheduler"])
        if ema is not None and payload["ema"] is not None:
            ema.module.load_state_dict(payload["ema"])
        for key, value in payload["progress"].items():
            setattr(progress, key, value)
        _set_rng_state(payload["rng"][self.dist.rank])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, progress.step, progress.epoch,
                 progress.batches_done)

    def _check_same_run(self, path: Path, saved: Optional[Dict[str, Any]]) -> None:
        """A ValueError when this run's config differs from the checkpoint's in a field that shapes training: the
        optimizer and schedule states would silently keep the old values (a new lr would not apply) and the data
        order would not continue. How long to train, how often to log, evaluate and save, and where, may change."""
        if saved is None:  # a checkpoint of a version that did not store its config
            return
        old, new = _flatten(saved), _flatten(self.config_to_save)
        own = getattr(self.task, "resume_may_change", frozenset())  # the task's evaluation-only fields, ...
        # Fields on one side only are not compared: a field added by a later intern2 keeps the old behaviour at
        # its default, and a checkpoint of a Python run that stored only `train` still resumes.
        changed = [key for key in sorted(set(old) & set(new))
                   if old[key] != new[key] and not _may_change_on_resume(key) and key not in own]
        if changed:
            shown = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:5])
            weights = self.out_dir / "model" if (self.out_dir / "model").is_dir() else path
            raise ValueError(f"train.resume: {path} continues a run with other settings ({shown}); resume with the "
                             f"run's own settings, or start a new run from its weights with checkpoint={weights} "
                             f"(and another out_dir)")

    # ------------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Dict[str, float]:
        """Run ``eval_step`` over the dataset (sharded across ranks unless FSDP), sum, summarise; a task whose
        metrics are not sums (COCO AP) provides ``evaluate(model, dataset, batch_size, device)`` instead."""
        if hasattr(self.task, "evaluate"):
            if self.cfg.fsdp:  # such tasks call submodules outside the FSDP-hooked forwards (a translator's generate)
                model = self._unsharded_copy(model, on_every_rank=True).to(self.dist.device).eval()
            return self.task.evaluate(model, dataset, self.cfg.batch_size, self.dist.device)
        shard = self.dist.distributed and not self.cfg.fsdp
        indices = list(range(len(dataset)))[self.dist.rank::self.dist.world_size] if shard else None
        loader = DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=indices,
                            num_workers=self.cfg.num_workers, collate_fn=self.task.collate)
        sums = accumulate_eval(model, loader, self.task.eval_step, self.dist.device, self._autocast)
        if shard:
            for key in sorted(sums):
                dist.all_reduce(sums[key])
        return self.task.summarize({k: v.cpu() for k, v in sums.items()})

    # ------------------------------------------------------------------------------------------------------- fit
    def fit(self) -> Dict[str, float]:
        try:
            return self._fit()
        finally:
            cleanup()

    def _fit(self) -> Dict[str, float]:
        cfg = self.cfg
        check_output(cfg.out_dir, "train.out_dir", folder=True)  # before the work (the CLI checks its --out too)
        self.dist = init_distributed(cfg.device)
        if cfg.fsdp and cfg.ema_decay:
            raise ValueError("train.ema_decay is not supported with train.fsdp (EMA of sharded parameters)")
        _seed_everything(cfg.seed)  # same initial weights on every rank
        model = self.task.build_model()
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"train.grad_checkpointing: {type(model).__name__} does not support gradient "
                                 f"checkpointing; leave it off")
            model.set_grad_checkpointing(True)
        if cfg.freeze_bn:  # before wrapping: DDP must not expect gradients for frozen parameters
            self._freeze_bn(model)
        model.to(self.dist.device)
        _seed_everything(cfg.seed + self.dist.rank)  # per-rank dropout / drop-path streams
        train_set, eval_set = self.task.train_dataset(), self.task.eval_dataset()
        steps_per_epoch = len(train_set) // self.dist.world_size // cfg.batch_size // cfg.grad_accum
        sampler = ShardedSampler(len(train_set), self.dist.rank, self.dist.world_size, cfg.seed,
                                 used=steps_per_epoch * cfg.grad_accum * cfg.batch_size)
        if steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x "
                             f"{self.dist.world_size} "
                             f"process(es) is larger than the {len(train_set)} training samples")
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        wrapped = self._wrap(model)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)
        elapsed = [0.0]  # training seconds, the same on every rank (refreshed each step when time_limit_s is set)
        schedule = lr_schedule(cfg.schedule, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        if cfg.time_limit_s is not None and cfg.schedule == "cosine":
            schedule = stretch_to_time(schedule, total_steps, cfg.warmup_steps, lambda: elapsed[0] / cfg.time_limit_s)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
        progress = _Progress()
        source = self._resume_source()
        if source is not None:
            self._load(source, wrapped, optimizer, scheduler, ema, progress)
            self._saved_at = progress.step  # that checkpoint is this step's
            if cfg.time_limit_s is not None and progress.elapsed_s >= cfg.time_limit_s:
                total_steps = min(total_steps, progress.step)  # a resumed run whose time was already spent
            # A finished run resumed still returns its final metrics: measured again (an evaluation setting may
            # have changed), their record replaced.
            progress.evaluated = progress.evaluated and progress.step < total_steps
            self._evaluated_at = progress.step if progress.evaluated else None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if remove_stale_temps(self.checkpoint_path()):  # left by a run killed while it saved
                log.info("removed the temp files of an interrupted checkpoint write in %s",
                         self.checkpoint_path().parent)
            if source is None and self.checkpoint_path().exists():
                # A new run: `resume=auto` must never continue the previous run's state after this one began.
                log.warning("starting a new run in %s: replacing the previous run's %s and metrics.jsonl now, its "
                            "model/ when this run ends (set train.resume=auto to continue a run instead)",
                            self.out_dir, self.checkpoint_path())
                self.checkpoint_path().unlink()
            config_text = json.dumps(self.config_to_save, indent=2)
            atomic_write(self.out_dir / "config.json", lambda tmp: Path(tmp).write_text(config_text))
        loader = self._loader(train_set, sampler, drop_last=True)
        metrics_file = self._open_metrics(progress if source is not None else None)
        bar = self._progress_bar(total_steps, progress.step)
        log.info("training %d steps (%d per epoch), %d process(es), device %s", total_steps, steps_per_epoch,
                 self.dist.world_size, self.dist.device)
        wrapped.train()
        eval_metrics: Dict[str, float] = {}
        window: Dict[str, List[float]] = {}
        bad_steps = 0
        skipped_before = skipped_at_start = getattr(self.task, "skipped", 0)
        drawn = 0  # samples the loader gave this run (batches are full: drop_last)
        finite = True  # every micro-batch loss of the step being accumulated was finite
        started = self._started = time.perf_counter() - progress.elapsed_s
        elapsed[0] = progress.elapsed_s
        try:
            if source is not None and progress.eval_pending and eval_set is not None:
                eval_metrics = self._eval_and_log(model, ema, eval_set, metrics_file, progress)
            while progress.step < total_steps:
                sampler.set_epoch(progress.epoch, start=progress.batches_done * cfg.batch_size)
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(progress.epoch)
                for batch in loader:
                    micro = progress.batches_done % cfg.grad_accum
                    boundary = micro == cfg.grad_accum - 1
                    ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
                    no_sync = wrapped.no_sync if (ddp and not boundary) else contextlib.nullcontext
                    with no_sync(), self._autocast(), _explain_batchnorm_error(cfg.batch_size):
                        loss, scalars = self.task.training_step(wrapped, _to_device(batch, self.dist.device))
                    with no_sync():
                        (loss / cfg.grad_accum).backward()
                    progress.batches_done += 1
                    drawn += cfg.batch_size
                    loss_value = loss.item()
                    finite = finite and math.isfinite(loss_value)
                    for key, value in {"loss": loss_value, **scalars}.items():
                        window.setdefault(key, []).append(float(value))
                    if not boundary:
                        continue
                    finite, step_finite = True, self._all_finite(finite)
                    if not step_finite:
                        bad_steps += 1
                        optimizer.zero_grad(set_to_none=True)
                        log.warning("non-finite loss at step %d: step skipped (%d in a row)", progress.step, bad_steps)
                        if bad_steps >= 10:
                            clip = "" if cfg.clip_grad else ", set train.clip_grad"
                            raise FloatingPointError(f"training diverged: 10 attempts in a row at step "
                                                     f"{progress.step + 1} had a non-finite loss; lower train.lr"
                                                     f"{clip} or check the data")
                        continue
                    bad_steps = 0
                    if self._replicated and self.dist.distributed:
                        self._average_replicated_grads()
                    if cfg.clip_grad:
                        window.setdefault("grad_norm", []).append(
                            float(nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.clip_grad)))
                    optimizer.step()
                    if cfg.fsdp and self.dist.distributed:
                        self._average_batchnorm_stats(wrapped)
                    if cfg.time_limit_s is not None:
                        elapsed[0] = self._elapsed(started)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                    progress.step += 1
                    if cfg.time_limit_s is not None and elapsed[0] >= cfg.time_limit_s:
                        total_steps = progress.step  # ends the run like max_steps would
                    if bar is not None:
                        bar.update(1)
                    if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                        self._log(metrics_file, progress, scheduler, window, started)
                        window = {}
                    # Save before evaluating: an evaluation that fails must not cost the step's checkpoint.
                    evaluate = bool(cfg.eval_every and progress.step % cfg.eval_every == 0 and eval_set is not None)
                    if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                        self._save(wrapped, optimizer, scheduler, ema, progress, eval_next=evaluate)
                    if evaluate:
                        eval_metrics = self._eval_and_log(model, ema, eval_set, metrics_file, progress)
                    if progress.step >= total_steps:
                        break
                if progress.step >= total_steps and progress.batches_done // cfg.grad_accum < steps_per_epoch:
                    break  # max_steps reached mid-epoch
                skipped = getattr(self.task, "skipped", 0)  # samples a task skipped and counted (unreadable, ...)
                if skipped > skipped_before:
                    log.warning("epoch %d: %d samples skipped (%d in all so far)", progress.epoch,
                                skipped - skipped_before, skipped)
                skipped_before = skipped
                self._check_samples_used(drawn, skipped - skipped_at_start)
                progress.epoch += 1
                progress.batches_done = 0
                evaluate = cfg.eval_every is None and eval_set is not None
                if cfg.checkpoint_every is None:
                    self._save(wrapped, optimizer, scheduler, ema, progress, eval_next=evaluate)
                if evaluate:
                    eval_metrics = self._eval_and_log(model, ema, eval_set, metrics_file, progress)
            self._check_samples_used(drawn, getattr(self.task, "skipped", 0) - skipped_at_start)
            evaluate = eval_set is not None and self._evaluated_at != progress.step  # the final model's metrics
            if self._saved_at != progress.step:  # a stop mid-epoch (max_steps, time limit) is resumable too
                self._save(wrapped, optimizer, scheduler, ema, progress, eval_next=evaluate)
            if evaluate:
                eval_metrics = self._eval_and_log(model, ema, eval_set, metrics_file, progress)
            final = self._final_model(wrapped, model, ema)
            self.model = model
            if self.dist.is_main:
                self.task.save_model(final, self.out_dir / "model")
                log.info("final model -> %s", self.out_dir / "model")
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
        return eval_metrics

    # --------------------------------------------------------------------------------------------------- helpers
    def _check_samples_used(self, drawn: int, skipped: int) -> None:
        """A ValueError when the task skipped every sample drawn so far (all unreadable): the run would save a
        model that learned nothing and exit as if it had trained. Counted over all ranks, since one rank's share
        alone may be unreadable; every rank calls this at the same points (it is a collective)."""
        if not hasattr(self.task, "skipped"):  # a task that never skips samples
            return
        counts = torch.tensor([float(drawn), float(skipped)], device=self.dist.device)
        if self.dist.distributed:
            dist.all_reduce(counts)  # SUM
        drawn_all, skipped_all = (int(count) for count in counts.tolist())
        if drawn_all and skipped_all >= drawn_all:
            raise ValueError(f"training data: all {drawn_all} samples drawn were unreadable and skipped, so nothing "
                             f"was learned (the warnings above name the files)")

    def _all_finite(self, finite: bool) -> bool:
        """Whether every rank's losses of this step were finite: all ranks must agree to skip a step (a rank that
        stepped while another skipped would leave the replicas apart)."""
        if not self.dist.distributed:
            return finite
        flag = torch.tensor(float(finite), device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _open_metrics(self, resumed: Optional[_Progress]):
        """``metrics.jsonl`` for appending on rank 0 (None elsewhere): a new run starts it anew, a resumed one
        keeps the records up to its checkpoint's step (those after it are about to be written again), that step's
        evaluation only if it was logged before the save (else it runs again)."""
        if not self.dist.is_main:
            return None
        path = self.out_dir / "metrics.jsonl"
        kept = ""
        if resumed is not None and path.exists():
            def keep(line: str) -> bool:
                split, step = _record_key(line)
                return step < resumed.step or (step == resumed.step and (split != "eval" or resumed.evaluated))
            kept = "".join(line + "\n" for line in path.read_text().splitlines() if keep(line))
        atomic_write(path, lambda tmp: Path(tmp).write_text(kept))
        return path.open("a")

    @staticmethod
    def _freeze_bn(model: nn.Module) -> None:
        """BatchNorm layers keep their running statistics and affine parameters, whatever train() says."""
        def use_running_stats(module: nn.Module, args) -> None:
            module.training = False
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
                module.register_forward_pre_hook(use_running_stats)

    def _average_replicated_grads(self) -> None:
        """Average the gradients of the parameters FSDP2 left whole over the ranks, as their sharded peers are."""
        with torch.no_grad():
            grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in self._replicated])
            dist.all_reduce(grads)  # SUM: gloo has no AVG
            for param, grad in zip(self._replicated, grads / self.dist.world_size):
                param.grad = grad.clone()

    def _average_batchnorm_stats(self, model: nn.Module) -> None:
        """FSDP2 shards parameters but leaves buffers alone, so each rank's BatchNorm running statistics would
        follow its own batches and ranks would evaluate (and rank 0 save) different models. Average them over the
        ranks after each step, in one collective (DDP instead copies rank 0's to every rank at each forward)."""
        stats = [buffer for module in model.modules()
                 if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
                 for buffer in (module.running_mean, module.running_var)]
        if not stats:
            return
        with torch.no_grad():
            flat = torch.cat([buffer.reshape(-1) for buffer in stats])
            dist.all_reduce(flat)  # SUM: gloo has no AVG
            flat /= self.dist.world_size
            for buffer, value in zip(stats, flat.split([buffer.numel() for buffer in stats])):
                buffer.copy_(value.view_as(buffer))

    def _elapsed(self, started: float) -> float:
        """Training seconds so far, the largest over the ranks: all ranks must agree on the lr and on when
        train.time_limit_s stops the run."""
        elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=self.dist.device)
        if self.dist.distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def _final_model(self, wrapped: nn.Module, model: nn.Module, ema: Optional[ModelEma]) -> nn.Module:
        if ema is not None:
            return ema.module
        if self.cfg.fsdp:
            plain = self._unsharded_copy(wrapped, on_every_rank=False)  # collective: every rank calls it
            return plain if self.dist.is_main else model
        return model

    def _unsharded_copy(self, wrapped: nn.Module, on_every_rank: bool) -> nn.Module:
        """A plain model with the full weights of an FSDP2-sharded one (on rank 0 only unless ``on_every_rank``;
        every rank must call this, the gather is collective)."""
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=not on_every_rank))
        if not (on_every_rank or self.dist.is_main):
            return wrapped  # this rank received no full weights
        plain = self.task.build_model()
        plain.load_state_dict(full)
        return plain

    def _eval_and_log(self, model, ema, eval_set, metrics_file, progress: _Progress) -> Dict[str, float]:
        # Evaluation must not draw from the training's random streams (a DataLoader iterator, a task's sampling
        # do): the checkpoint before it holds them, and a resumed run may not evaluate at that step.
        state = _rng_state()
        try:
            metrics = self.evaluate(ema.module if ema is not None else model, eval_set)
        finally:
            _set_rng_state(state)
        self._evaluated_at = progress.step
        if metrics_file is not None:
            metrics_file.write(json.dumps({"split": "eval", "step": progress.step, "epoch": progress.epoch,
                                           **metrics}) + "\n")
            metrics_file.flush()
        log.info("eval step %d: %s", progress.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                              if isinstance(v, (int, float))))
        return metrics

    def _log(self, metrics_file, progress: _Progress, scheduler, window: Dict[str, List[float]], started) -> None:
        values = {k: sum(v) / len(v) for k, v in window.items() if v}
        record = {"split": "train", "step": progress.step, "epoch": progress.epoch,
                  "lr": scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - started, 3), **values}
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            log.info("step %d epoch %d lr %.3g %s", progress.step, progress.epoch, record["lr"],
                     " ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def _progress_bar(self, total: int, done: int):
        if not (self.dist.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
