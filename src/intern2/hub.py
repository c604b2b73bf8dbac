"""Where a pretrained tag's weights are on this machine: an explicit path, ``$INTERN2_HOME``, else the Hugging Face
Hub cache through ``huggingface_hub`` (as timm, open_clip and transformers resolve theirs).

The order, in timm's pretrained-config keys: ``file``, a local path (a file or folder the user gave); then the
published name (``hf_hub_filename``) in ``$INTERN2_HOME`` (default ``~/.cache/intern2``); then the tag's Hub repo
(``hf_hub_id``): ``hf_hub_download`` of the file, or, for a name without a suffix (an HF transformers folder such as
NLLB-200's), the repo's snapshot. A published name is never read from the current folder. With
``HF_HUB_OFFLINE=1`` (or ``download=False``) only the cache is read, and a missing file is an error that says which
repo and file to fetch. Downloads go through ``huggingface_hub``, which writes into the cache
atomically (an interrupted download leaves no partial file under the name it will be read by).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

from .checkpoint import UnreadableFileError

__all__ = ["resolve_weights", "local_folder", "hub_repo", "hub_origin", "reading_download", "intern2_home",
           "hub_offline", "ENV_HOME", "HF_HUB_PREFIX"]

ENV_HOME = "INTERN2_HOME"
# What a folder tag needs from its repo (weights, configs, tokenizer files); not the repo's other formats.
_FOLDER_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
# Left out for a model built without its weights (timm's pretrained=False downloads no weights either).
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# A Hub repo id as huggingface_hub validates one: owner/name of ASCII letters, digits, '-', '_' and '.', no '--'
# or '..', at most 96 characters a part.
_REPO_ID = re.compile(r"(?!.*(--|\.\.))(?=[^/]{1,96}/[^/]{1,96}$)"
                      r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]")
HF_HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hub repo
# Names of files a user passes where a folder may go ("runs/model.pth" is a missing file, not a repo).
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".h5", ".onnx",
                  ".json", ".yaml", ".yml", ".txt", ".csv", ".tar", ".zip", ".gz", ".gguf")


def intern2_home() -> Path:
    return Path(os.environ.get(ENV_HOME, Path.home() / ".cache" / "intern2"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (its constant is read at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _is_folder(name: str) -> bool:
    """Folder tags name an HF folder (no file suffix); file tags a file in the repo (.pth, .bin, ...)."""
    return not Path(name).suffix


def resolve_weights(cfg: Mapping[str, Any], cache_dir: Optional[Union[str, os.PathLike]] = None,
                    download: bool = True) -> Path:
    """The local path of a pretrained config's weights (a file, or a folder for folder tags); see the module
    docstring for the order. Errors name the tag, the repo and the file, and what to do."""
    local, hub, url = cfg.get("file"), cfg.get("hf_hub_id"), cfg.get("url")
    tag = ".".join(p for p in (cfg.get("architecture"), cfg.get("tag")) if p) or "the model"
    if local and Path(local).exists():
        return Path(local)
    if local and "hf_hub_filename" in cfg:
        raise FileNotFoundError(f"{tag}: file {local}: no such file or folder")
    # A config saved before the keys were split names the published file under ``file``.
    name = cfg.get("hf_hub_filename") or local
    if not name and not hub:
        raise ValueError(f"{tag}: its pretrained config names no weights (no file, no Hub repo): pass "
                         f"checkpoint_path=..., or use a tag (intern2 list --pretrained)")
    home = intern2_home() / Path(name).name if name else None
    if home is not None and home.exists():
        return home
    if not hub:
        raise FileNotFoundError(f"{tag}: weights {Path(name).name} are not at {home}; they are published at "
                                f"{url or 'no known address'}: download them there (or set ${ENV_HOME}), or pass "
                                f"checkpoint_path=...")
    return _from_hub(hub, name, tag, cache_dir or os.environ.get("HF_HUB_CACHE"), download and not hub_offline())


def hub_repo(name: Union[str, os.PathLike]) -> Optional[str]:
    """The Hub repo ``name`` stands for, as transformers' ``from_pretrained`` reads one: ``owner/name`` that is no
    local path (a weight file's name is a path), or timm's ``hf-hub:owner/name`` (a ValueError when what follows is
    no repo id); None for a local path."""
    name = os.fspath(name)
    if name.startswith(HF_HUB_PREFIX):
        if not _REPO_ID.fullmatch(name[len(HF_HUB_PREFIX):]):
            raise ValueError(f"{name}: expected {HF_HUB_PREFIX}owner/name (a Hugging Face Hub repo id)")
        return name[len(HF_HUB_PREFIX):]
    if _REPO_ID.fullmatch(name) and not name.lower().endswith(_FILE_SUFFIXES) and not Path(name).exists():
        return name
    return None


@contextlib.contextmanager
def local_folder(name: Union[str, os.PathLike], flag: str = "", cache_dir: Optional[Union[str, os.PathLike]] = None,
                 download: bool = True, weights: bool = True) -> Iterator[Path]:
    """``name`` as a local path in the ``with`` body: itself, or for a Hub repo (:func:`hub_repo`) its snapshot in
    the Hugging Face cache, downloaded when online (and ``download``; the weight files only with ``weights``), where
    a file the body cannot read is named as a damaged download. Errors start with ``flag`` (the argument that gave
    ``name``) and say what to fetch."""
    repo = hub_repo(name)
    if repo is None:
        yield Path(name)
        return
    name = os.fspath(name)
    tag = " ".join(filter(None, (flag, name if name.startswith(HF_HUB_PREFIX) else
                                 f"{name} (no such local folder: read as a Hub repo)")))
    patterns = _FOLDER_PATTERNS if weights else [p for p in _FOLDER_PATTERNS if p not in _WEIGHT_PATTERNS]
    download = download and not hub_offline()
    folder = _from_hub(repo, None, tag, cache_dir or os.environ.get("HF_HUB_CACHE"), download,
                       elsewhere="download it to a folder and give that folder", patterns=patterns)
    if weights and not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        # e.g. a snapshot cached without its weights (weights=False), read offline
        files = ", ".join(_WEIGHT_PATTERNS)
        reason = (f"the Hub repo {repo} has no weight files ({files})" if download else
                  f"the cached snapshot of {repo} has no weight files ({files}) and downloading is off: fetch them "
                  f"with `hf download {repo}`")
        raise FileNotFoundError(f"{tag}: {reason}")
    with reading_download(folder):
        yield folder


def hub_origin(cfg: Mapping[str, Any], repo: str) -> Dict[str, Any]:
    """A pretrained_cfg loaded from the Hub repo ``repo``: the repo it came from (the folder's own config may name
    the published file of the weights it started from)."""
    return {**cfg, "hf_hub_id": repo, "hf_hub_filename": None}


@contextlib.contextmanager
def reading_download(path: Path) -> Iterator[None]:
    """Around loading weights :func:`resolve_weights` found: a file that cannot be read there is most likely a
    damaged download, and the error says what to do about it."""
    try:
        yield
    except UnreadableFileError as exc:
        raise UnreadableFileError(f"{exc} (a damaged download? delete {path} and fetch it again)") from None


def _from_hub(repo: str, name: Optional[str], tag: str, cache_dir: Optional[Union[str, os.PathLike]],
              download: bool, elsewhere: Optional[str] = None, patterns: Sequence[str] = _FOLDER_PATTERNS) -> Path:
    """``name`` of ``repo`` (its snapshot of the files matching ``patterns`` for a folder) from the cache, or
    downloaded; errors start with ``tag`` and end with ``elsewhere``, the other place the user can put it (default:
    ``$INTERN2_HOME``)."""
    elsewhere = elsewhere or f"put {Path(name or repo).name} in {intern2_home()}"
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            OfflineModeIsEnabled, RepositoryNotFoundError)
    except ImportError:
        raise ImportError(f"{tag}: fetching weights from the Hub needs huggingface_hub: pip install huggingface_hub "
                          f"(or {elsewhere})") from None
    from huggingface_hub import constants
    cache = cache_dir or constants.HF_HUB_CACHE
    what = f"{repo}" if not name or _is_folder(name) else f"{name} of {repo}"
    fetch = (f"hf download {repo}" + (f" {name}" if name and not _is_folder(name) else "")
             + (f" --cache-dir {cache_dir}" if cache_dir else ""))
    try:
        if not name or _is_folder(name):
            return Path(snapshot_download(repo, cache_dir=cache_dir, local_files_only=not download,
                                          allow_patterns=list(patterns)))
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=not download))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # huggingface_hub answers LocalEntryNotFoundError also when it tried to download and could not connect.
        reason = ("HF_HUB_OFFLINE=1" if hub_offline() else "downloading is off (download=False)" if not download
                  else "the Hub could not be reached")
        raise FileNotFoundError(f"{tag}: {what} is not in the Hugging Face cache ({cache}) and {reason}: fetch it "
                                f"with `{fetch}` (or {elsewhere})") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{tag}: the Hub has no repo {repo} (or it is private)") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{tag}: the Hub repo {repo} has no file {name}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise OSError(f"{tag}: could not fetch {what} from the Hub ({type(exc).__name__}: {exc}); fetch it with "
                      f"`{fetch}` (or {elsewhere})") from None
