"""Reading and writing weights: official .pth / mmcv / HF-hub layouts in, safetensors + config.json out.

Nothing here executes code from a checkpoint: pickles are read with ``torch.load(weights_only=True)``. Official
InternImage training files also pickle a yacs ``CfgNode``; it is read as a plain ``OrderedDict`` through a data-only
stand-in class, so yacs need not be installed and a malicious pickle still cannot run anything.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["read_checkpoint", "read_state_dict", "read_config", "load_checkpoint", "save_pretrained",
           "atomic_write", "atomic_write_all", "remove_stale_temps", "check_output", "adapt_input_conv", "WEIGHTS_NAME",
           "CONFIG_NAME", "UnreadableFileError"]

log = logging.getLogger(__name__)


class UnreadableFileError(ValueError):
    """A weights or tokenizer file that exists but whose bytes do not parse (truncated, damaged, another format):
    where the file came from a download, :func:`~intern2.hub.reading_download` adds what to do about it."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
# Containers that hold the weights, in the order they are looked for.
_WEIGHT_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")
Source = Union[str, os.PathLike, Mapping[str, Any]]


class _YacsConfigNode(dict):
    """Data-only stand-in for ``yacs.config.CfgNode``: unpickles as an OrderedDict, runs no yacs code."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


_YacsConfigNode.__module__ = "yacs.config"
_YacsConfigNode.__qualname__ = _YacsConfigNode.__name__ = "CfgNode"


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([_YacsConfigNode]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError for truncated zips, ...
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # "Unsupported operand N": bytes that are no pickle opcode at all (an HTML page, an LFS pointer), not a
        # refused object.
        refused = not any("unsupported operand" in line.lower() for line in lines)
        if lines[0].startswith("Weights only load failed") and refused:
            # torch ends a refusal with a generic pointer to its docs; the line naming what it refused says more
            # ("Unsupported global: GLOBAL builtins.print", "Trying to load unsupported GLOBAL posix.system ...")
            named = [line[line.lower().index("unsupported"):].split(". ")[0] for line in lines
                     if "unsupported" in line.lower()]
            reason = named[0] if named else lines[-1]
            raise ValueError(f"cannot read checkpoint {path}: {reason.rstrip('.')}. intern2 loads pickles with "
                             f"weights_only=True and refuses objects other than tensors and plain data") from exc
        # Not a refusal: a damaged file (torch's first sentence says what broke; the rest is advice)
        reason = f"{type(exc).__name__}: {lines[0].split('. ')[0].rstrip('.')}" if refused else "not a pickle"
        raise UnreadableFileError(f"cannot read checkpoint {path}: {reason} (a damaged or truncated file, or not a "
                                  f"PyTorch checkpoint?)") from exc


def read_config(folder: Union[str, os.PathLike], name: str = CONFIG_NAME) -> Dict[str, Any]:
    """A model folder's ``config.json`` (or another JSON file ``name`` of it) as a JSON object; errors name the
    file."""
    config_path = Path(folder) / name
    if not config_path.exists():
        raise ValueError(f"checkpoint folder {folder} has no {name}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ValueError(f"{config_path}: nested too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_folder(folder: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    config = read_config(folder)
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "model.pth"):
        if (folder / name).exists():
            state, _ = read_checkpoint(folder / name)
            return state, config
    raise ValueError(f"checkpoint folder {folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} or pytorch_model.bin")


def _unwrap(obj: Any, where: str, keys: Sequence[str] = _WEIGHT_KEYS) -> Dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (under the first of ``keys`` it has) and drop
    DistributedDataParallel's 'module.' prefix."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in keys:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], where, keys)
        raise ValueError(f"{where}: no weights found; expected a state dict or a dict with one of "
                         f"{list(keys)}, got top-level keys {sorted(map(str, obj))[:12]}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_checkpoint(source: Source, keys: Sequence[str] = _WEIGHT_KEYS
                    ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(state dict, config or None) from a path (.safetensors, .pth/.bin/..., or a folder with config.json) or
    an in-memory dict in any supported layout; a training checkpoint's weights are taken from the first of
    ``keys`` it holds."""
    if isinstance(source, Mapping):
        return _unwrap(source, "in-memory checkpoint", keys), None
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), None
        except SafetensorError as exc:
            raise UnreadableFileError(f"cannot read checkpoint {path}: {exc}") from exc
    if path.suffix in _PICKLE_SUFFIXES:
        return _unwrap(_torch_load(path), str(path), keys), None
    raise ValueError(f"checkpoint {path}: unsupported file type {path.suffix!r}; expected .safetensors, "
                     f"{', '.join(_PICKLE_SUFFIXES)} or a folder with {CONFIG_NAME}")


def read_state_dict(source: Source, keys: Sequence[str] = _WEIGHT_KEYS) -> Dict[str, torch.Tensor]:
    """The state dict of :func:`read_checkpoint`."""
    return read_checkpoint(source, keys)[0]


def _classifier_keys(model: nn.Module) -> set:
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None or getattr(model, "features_only", False):
        return set()
    head = get_classifier()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def load_checkpoint(model: nn.Module, source: Source, strict: bool = True, allow_new_head: bool = True):
    """Load weights from ``source`` into ``model``; returns torch's (missing_keys, unexpected_keys).

    A model's ``checkpoint_keys`` say which weights of a training checkpoint it evaluates (ActionFormer: the EMA
    ones first). The model's own ``checkpoint_filter`` (if any) adapts official layouts first; a checkpoint
    classifier the model lacks (``num_classes=0``) is dropped and an RGB first conv adapted to ``in_chans``
    (timm's rules, each logged). With ``allow_new_head``, a classifier whose shape differs (a replaced head, e.g.
    1000 -> 10 classes) is left at its fresh initialisation and logged; every other mismatch is an error when
    ``strict``.
    """
    state = read_state_dict(source, getattr(model, "checkpoint_keys", _WEIGHT_KEYS))
    where = source if not isinstance(source, Mapping) else "in-memory checkpoint"
    if hasattr(model, "checkpoint_filter"):
        state = model.checkpoint_filter(state)
    own = model.state_dict()
    state = _fit_ends(model, state, own, where)
    replaced = sorted(k for k in _classifier_keys(model) if k in state and state[k].shape != own[k].shape)
    if replaced and not allow_new_head:
        ours, theirs = own[replaced[0]].shape[0], state[replaced[0]].shape[0]
        # Only where the rest fits is num_classes the fix; another architecture (it shares few tensor names, e.g.
        # only "norm.weight") gets the errors below, which name it. An extra key or two (an aux head) still fits.
        body = [k for k in state if k not in replaced]
        shared = [k for k in body if k in own]
        body_fits = 2 * len(shared) >= len(body) and all(state[k].shape == own[k].shape for k in shared)
        if ours != theirs and body_fits:  # a random head under the model's label names would answer wrongly
            raise ValueError(f"{where}: the checkpoint's classifier has {theirs} classes, the model's {ours}: build "
                             f"the model with num_classes={theirs} (intern2 convert --set num_classes={theirs} makes "
                             f"a model folder of the file)")
        replaced = []  # another width: the shape error below names the tensors
    if replaced:
        log.info("%s: classifier shape differs (checkpoint %s, model %s): keeping a freshly initialised head (%s)",
                 where, tuple(state[replaced[0]].shape), tuple(own[replaced[0]].shape), ", ".join(sorted(replaced)))
        state = {k: v for k, v in state.items() if k not in replaced}
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        listed = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in wrong[:5])
        raise ValueError(f"{where}: {len(wrong)} tensor shapes do not match the model: {listed}")
    result = model.load_state_dict(state, strict=False)
    # A tied alias (stored once by save_pretrained) was filled through the tensor it shares.
    tied = _tied_names(model) if result.missing_keys else {}
    missing = [k for k in result.missing_keys if k not in replaced and not any(n in state for n in tied.get(k, ()))]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(f"{where}: checkpoint does not fit the model: {len(missing)} missing keys "
                         f"{missing[:8]}, {len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:8]}")
    return result


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB first-conv weight (out, 3, ...) for ``in_chans`` input channels, as timm adapts it: one channel sums
    the three filters (a grey image gets the RGB model's response); more repeat them cyclically, scaled by
    3 / in_chans."""
    if weight.shape[1] != 3:
        raise ValueError(f"adapt_input_conv: expected an RGB weight (out, 3, ...), got {tuple(weight.shape)}")
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeats = -(-in_chans // 3)
    return weight.repeat(1, repeats, *[1] * (weight.dim() - 2))[:, :in_chans] * (3 / in_chans)


def _fit_ends(model: nn.Module, state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
              where: Any) -> Dict[str, torch.Tensor]:
    """The two adaptations timm makes between a checkpoint and a model built with other ends, found through the
    model's ``pretrained_cfg`` names: a classifier the model does not have (``num_classes=0``, a feature
    extractor) is dropped, and an RGB ``first_conv`` is adapted to the model's input channels. Each says so."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier, first_conv = cfg.get("classifier"), cfg.get("first_conv")
    if classifier:
        dropped = sorted(k for k in state if k.startswith(f"{classifier}.") and k not in own)
        if dropped and not any(k.startswith(f"{classifier}.") for k in own):
            log.info("%s: the model has no classifier (num_classes=0): dropping the checkpoint's %s", where,
                     ", ".join(dropped))
            state = {k: v for k, v in state.items() if k not in dropped}
    key = f"{first_conv}.weight" if first_conv else None
    if key in state and key in own and state[key].shape[1] == 3 != own[key].shape[1] and \
            state[key].shape[2:] == own[key].shape[2:]:
        log.info("%s: adapting the RGB input convolution %s to %d input channels", where, first_conv,
                 own[key].shape[1])
        state = {**state, key: adapt_input_conv(state[key].float(), own[key].shape[1]).to(state[key].dtype)}
    return state


def atomic_write(path: Union[str, os.PathLike], write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file, and after a
    crash (even kill -9 or a power cut: the data and the rename are fsync'ed) ``path`` holds the old or the new
    content. Temp files left by earlier killed writes of ``path`` are removed first; the file gets the
    permissions the umask gives new files (not mkstemp's 0600)."""
    atomic_write_all([(path, write)])


def atomic_write_all(writes: Sequence[Tuple[Union[str, os.PathLike], Any]]) -> None:
    """:func:`atomic_write` of several ``(path, write)`` files that belong together (a model's weights and
    config): every file is written and fsync'ed before the first rename, so a failed or interrupted write keeps
    all the old files; the renames follow one another (in the given order) within microseconds."""
    temps: List[Tuple[str, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for folder in dict.fromkeys(path.parent for _, path in temps):
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp"


def remove_stale_temps(path: Union[str, os.PathLike]) -> int:
    """Remove the temp files that killed :func:`atomic_write` calls of ``path`` left (a SIGKILL runs no cleanup);
    returns how many. Only one writer per path is assumed, as for a run's checkpoint."""
    path = Path(path)
    stale = list(path.parent.glob(f"{glob.escape(_temp_prefix(path))}*")) if path.parent.is_dir() else []
    for temp in stale:
        temp.unlink(missing_ok=True)
    return len(stale)


def check_output(path: Union[str, os.PathLike], flag: str, folder: bool = False) -> Path:
    """``path`` if a file (or with ``folder``, a folder) can be written there, else a ValueError naming ``flag``:
    checked before the work, so a minute of export or translation is not lost to a typo in the output path."""
    if not str(path).strip():  # Path("") is the current folder: never what an empty argument meant
        raise ValueError(f"{flag}: empty path; expected a {'folder' if folder else 'file'} to write")
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file; expected a folder (new or existing)")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; expected a file")
    # A file is replaced by renaming a temp file in its folder, so that folder must be writable; a folder is
    # written into.
    existing = path if folder and path.exists() else path.parent
    while not existing.exists():  # the folders atomic_write / save_pretrained will create
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path}: {existing} is not a writable folder")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alias_key(tensor: torch.Tensor) -> Tuple:
    """Equal for two tensors that are the same memory seen the same way (tied weights)."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _tied_names(model: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """``{name: every state-dict name of the same tensor}`` for the tied entries of ``model``."""
    groups: Dict[Tuple, list] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel():
            groups.setdefault(_alias_key(tensor), []).append(name)
    return {name: tuple(group) for group in groups.values() if len(group) > 1 for name in group}


def _unique_storage(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop tied aliases (safetensors refuses tensors that share memory) and copy other overlapping views."""
    seen: Dict[Tuple, str] = {}
    storages = set()
    out = {}
    for name, tensor in state.items():
        key = _alias_key(tensor)
        if tensor.numel() and key in seen:
            continue  # the model re-ties it on load (load_checkpoint accepts a missing alias)
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if tensor.numel() and storage in storages else tensor
        seen[key] = name
        storages.add(storage)
    return out


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike], config: Dict[str, Any]) -> Path:
    """Write ``config.json`` (``config``) and ``model.safetensors`` (the state dict) into ``directory``; a tensor
    tied to another one (same memory) is stored once, under its first name."""
    from safetensors.torch import save_file
    directory = Path(directory)
    state = _unique_storage({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    # One step for the pair: a failed or interrupted save keeps the old weights with the old config.
    atomic_write_all([(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2))),
                      (directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))])
    return directory
