"""What every pipeline shares: loading a model for inference, the :class:`Pipeline` base (protocol and label
names read once from the model's weights metadata), top-k results, and the CLI plumbing of the inference
commands."""
from __future__ import annotations

import argparse
import collections.abc
import functools
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from ..checkpoint import check_output
from ..config import error_message
from ..weights import labels_from_cfg, protocol_from_cfg, task_of

__all__ = ["Pipeline", "DTYPES", "cpu_has_bf16", "requested_dtype", "inference_dtype", "model_dtype", "load_model",
           "load_model_spec", "model_task", "top_k", "setup_logging", "add_model_arguments", "model_from_args",
           "pipeline_from_args", "option_error", "print_topk", "open_pipeline", "pair",
           "task_of_arguments", "run_on_images", "check_aspect", "progress", "expand_files",
           "files_or_exit", "image_files_or_exit", "counted"]

log = logging.getLogger(__name__)
T = TypeVar("T")


_LOGGING = {"configured": False}


def setup_logging(verbose: Optional[int] = None) -> None:
    """intern2's loggers at INFO (DEBUG with ``verbose`` 2), every library's at WARNING (INFO with ``verbose``
    1), one stderr handler. The first call configures; later calls change the levels only when ``verbose`` is
    given (the CLI sets it once, from -v)."""
    root = logging.getLogger()
    if not _LOGGING["configured"]:
        _LOGGING["configured"] = True
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
    elif verbose is None:
        return
    verbose = verbose or 0
    root.setLevel(logging.INFO if verbose >= 1 else logging.WARNING)
    logging.getLogger("intern2").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


# ------------------------------------------------------------------------------------------------- loading
CLI_NAMES = ("--checkpoint", "--model")  # how load_model's arguments are named in its errors
PYTHON_NAMES = ("checkpoint=", "model=")


def local_checkpoint(source: Optional[str]) -> Optional[str]:
    """The local path of a pipeline's ``source``: for a Hub repo its snapshot, looked up in the cache only (after
    :func:`load_model` read the model from it), where the pipeline finds the tokenizer; else ``source`` itself."""
    from ..hub import hub_repo, local_folder
    if not source or hub_repo(source) is None:
        return source
    with local_folder(source, download=False) as folder:
        return str(folder)


def load_model(checkpoint: Optional[str], model_name: Optional[str], pretrained: bool = False,
               names: Tuple[str, str] = CLI_NAMES) -> nn.Module:
    """``model_name`` ('arch' or 'arch.tag') with an optional checkpoint in any supported layout (a file, or a
    folder holding one, e.g. an HF VideoMAE conversion) or ``pretrained`` (the tag's official weights, through the
    Hub cache), or without a name a folder written by training / save_pretrained (or an HF folder intern2
    rebuilds); in eval mode. A checkpoint that is a Hub repo (``owner/name``) is its snapshot in the Hugging Face
    cache, downloaded when online. Errors call the two arguments ``names`` (the CLI's flags by default)."""
    from ..factory import create_model, from_pretrained
    from ..hub import hub_origin, hub_repo, local_folder
    repo = hub_repo(checkpoint) if checkpoint else None
    if repo is not None:
        with local_folder(checkpoint, names[0]) as folder:
            model = load_model(str(folder), model_name, pretrained, names)
        model.pretrained_cfg = hub_origin(getattr(model, "pretrained_cfg", {}), repo)
        return model
    if checkpoint and Path(checkpoint).is_dir() and model_name is None:
        return from_pretrained(checkpoint).eval()
    if model_name is None:
        if checkpoint and not Path(checkpoint).exists():
            raise FileNotFoundError(f"{names[0]} {checkpoint}: no such file or folder")
        raise ValueError(f"{names[1]} is required unless {names[0]} is a model folder (config.json + weights)")
    if not isinstance(model_name, str):
        raise TypeError(f"{names[1]} expected a model name, got {type(model_name).__name__}")
    model = create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint).eval()
    if checkpoint is None and not pretrained:  # after the name was found: a typo is its own error
        missing = "no :WEIGHTS after the name" if names[0] == names[1] else f"no {names[0].rstrip('=')}"
        log.warning("%s: %s has random weights (its answers mean nothing)%s", missing, model_name,
                    "; pretrained=True loads the official ones" if names == PYTHON_NAMES else "")
    return model


def load_model_spec(spec: str, flag: Optional[str] = None) -> nn.Module:
    """A model from ``FOLDER``, a Hub repo (``owner/name``), ``NAME`` (random weights: for trying the API) or
    ``NAME:WEIGHTS_FILE``; errors name ``flag``, the argument that gave it."""
    from ..hub import hub_repo
    names = (flag, flag) if flag else CLI_NAMES
    if Path(spec).is_dir() or hub_repo(spec):
        return load_model(spec, None, names=names)
    name, colon, weights = spec.partition(":")
    if "/" in name or name.startswith("."):  # a path, not a registered name
        raise FileNotFoundError(f"{spec}: no such file or folder (expected a model folder, NAME or NAME:WEIGHTS)")
    if colon and not weights.strip():  # 'NAME:' would silently serve random weights
        raise ValueError(f"{spec}: nothing after ':'; expected NAME:WEIGHTS_FILE (or NAME alone for random weights)")
    if not name.strip():
        raise ValueError(f"{spec!r}: no model name; expected a model folder, NAME or NAME:WEIGHTS_FILE")
    return load_model(weights or None, name, names=names)


def model_task(model: nn.Module) -> Optional[str]:
    """The task a model was built for: its weights metadata's, else its architecture name's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("task") or task_of(cfg.get("architecture") or "")


# ------------------------------------------------------------------------------------------------- dtypes
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX-512-BF16 or AMX); without them torch emulates bfloat16
    arithmetic, slower than float32."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def requested_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` ('fp32', 'bf16', or a torch dtype) as a torch dtype; anything else is a ValueError."""
    resolved = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected fp32 or bf16, got {dtype!r}")
    return resolved


def inference_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``dtype`` ('fp32', 'bf16', or a torch dtype) to run at on ``device``: bfloat16 on a CPU without bfloat16
    instructions falls back to float32, with a warning that says so."""
    resolved = requested_dtype(dtype)
    if resolved == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        log.warning("this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16): running in float32")
        return torch.float32
    return resolved


def pipeline_device(device: Any) -> torch.device:
    """``device`` ('cpu', 'cuda', 'cuda:1' or a torch.device) to run a pipeline on; a CUDA device where torch sees
    none is a ValueError naming the argument."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"device: {device!r} asked for, but torch sees only {seen}")
    return resolved


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters: inputs are cast to it (a bfloat16 model takes bfloat16)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ----------------------------------------------------------------------------------------------- pipelines
class Pipeline:
    """A model in eval mode with its evaluation protocol and class names, read once from its weights metadata
    (``model.pretrained_cfg``); subclasses turn inputs into labelled answers.

    ``source`` names where the model came from (a folder, a file) in error messages. Protocol fields given as
    keyword arguments override the metadata (the CLI's ``--test-size``, ``--clips``, ...; None: keep).
    ``device`` (``'cuda'``, ``'cuda:1'``, ...) moves the model there, as HF pipelines' ``device=`` does (default:
    where the model is); inputs follow the model. ``dtype`` (``'bf16'`` / ``torch.bfloat16``) converts the model
    in place, as ``nn.Module.to`` does (:func:`inference_dtype`: float32 where the CPU has no bfloat16
    instructions); inputs are cast to the model's dtype, so a model converted by the caller
    (``model.to(torch.bfloat16)``) runs in it as well; results are float32.
    """

    task: ClassVar[str] = ""
    expects: ClassVar[str] = ""  # what the pipeline takes, for the wrong-model error
    bfloat16: ClassVar[bool] = True  # whether the family runs in bfloat16 (detection: float32 only)

    def __init__(self, model: nn.Module, source: Optional[str] = None, dtype: Any = None, device: Any = None,
                 **protocol: Any):
        self.check_model(model)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        where = f"{source or cfg.get('architecture') or type(model).__name__}: pretrained_cfg"
        if device is not None:
            model = model.to(pipeline_device(device))
        if dtype is not None:
            # The family's refusal first: it must not depend on whether this CPU would fall back to float32.
            if requested_dtype(dtype) == torch.bfloat16 and not self.bfloat16:
                raise ValueError(f"dtype: {type(self).__name__} runs in float32 only")
            model = model.to(inference_dtype(dtype, next(model.parameters()).device))
        if not self.bfloat16 and model_dtype(model) != torch.float32:  # converted by the caller
            raise ValueError(f"{type(self).__name__} runs in float32 only, the model is in "
                             f"{str(model_dtype(model)).removeprefix('torch.')}: give it model.float()")
        self.model = model.eval()
        self.source = source
        self.protocol = protocol_from_cfg(cfg, self.task, where).replace(**protocol)
        self.labels = labels_from_cfg(cfg, getattr(model, "num_classes", 0) or 0, where)

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        """The model classes this pipeline runs (imported on use: pipelines load only their family)."""
        raise NotImplementedError

    @classmethod
    def check_model(cls, model: Any) -> None:
        if not isinstance(model, cls.model_types()):
            arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
            raise TypeError(f"{cls.__name__}: expected {cls.expects}, got {type(model).__name__}"
                            + (f" ({arch}, {_a(task_of(arch) or 'unknown')} model)" if arch else ""))

    @classmethod
    def from_pretrained(cls, checkpoint: Optional[str] = None, model: Optional[str] = None,
                        **options: Any) -> "Pipeline":
        """Load ``checkpoint`` (a model folder, or a weight file with ``model``: a registered name) and wrap
        it; ``options`` go to the pipeline (protocol overrides)."""
        return cls(load_model(checkpoint, model, names=PYTHON_NAMES), source=checkpoint or model, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype: what the inputs are cast to."""
        return model_dtype(self.model)


def open_pipeline(checkpoint: Optional[str] = None, model: Any = None, task: Optional[str] = None,
                  pretrained: bool = False, **options: Any) -> Pipeline:
    """The pipeline of a model's task (``task``, else the model's own): ``open_pipeline('runs/seg/model')``,
    ``open_pipeline(model='internimage_t.in1k', pretrained=True)`` (the official weights, through the Hub cache),
    ``open_pipeline(model=module)`` (a model already built); ``options`` go to the pipeline."""
    from . import pipeline_class
    if isinstance(model, nn.Module):
        if checkpoint is not None or pretrained:
            raise ValueError("open_pipeline: model= is a built model; checkpoint= and pretrained= are for a name")
        return pipeline_class(task or model_task(model))(model, source=None, **options)
    loaded = load_model(checkpoint, model, pretrained, PYTHON_NAMES)
    task = task or model_task(loaded) or folder_task(local_checkpoint(checkpoint))
    return pipeline_class(task)(loaded, source=checkpoint or model, **options)


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterator[T]:
    """``items`` with a progress bar on stderr when it is a terminal (tqdm), and intern2's log lines written
    through the bar instead of breaking it; plain ``items`` otherwise (pipes, files, tests)."""
    if not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():
        yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


MAX_ASPECT_RATIO = 20.0  # a shorter-side resize of a longer strip would make a tensor of gigabytes


def check_aspect(width: int, height: int, what: str = "image") -> None:
    """A ValueError for an image (or video frame) too elongated for a shorter-side resize (e.g. 10000 x 1, which
    resized to 224 on its short side is 2.2 million pixels long)."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"{what} of {width} x {height} pixels: an aspect ratio of {ratio:.0f}:1 is more than the "
                         f"{MAX_ASPECT_RATIO:.0f}:1 a shorter-side resize can take; crop it first")


def top_k(probs: torch.Tensor, labels: Sequence[str], k: int) -> List[Dict[str, Any]]:
    """The ``k`` most probable classes: ``[{"label", "index", "prob"}]`` (index: the class's position in the
    model's label list), best first."""
    values, indices = probs.float().topk(min(positive_count(k, "topk"), probs.numel()))
    return [{"label": labels[i], "index": int(i), "prob": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist())]


# ---------------------------------------------------------------------------------------------------- CLI
def add_model_arguments(parser: argparse.ArgumentParser, run_options: bool = True) -> None:
    """--checkpoint / --model, shared by the commands that load a trained or official model; with ``run_options``
    (the commands that run it) also --task (chosen by the dispatcher) and --dtype."""
    parser.add_argument("--checkpoint", help="model folder or a Hub repo of one (owner/name), or a weight file used "
                        "with --model")
    parser.add_argument("--model", help="registered model name, optionally with a pretrained tag "
                        "(internimage_t.in1k); needed unless --checkpoint is a model folder")
    if not run_options:
        return
    parser.add_argument("--task", help="image-cls, segment, detect, video-cls, video-text, tal or translation "
                        "(default: from the model's weights metadata or architecture)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="run the model in bfloat16 (fast where the CPU "
                        "has AVX-512-BF16 or AMX; elsewhere it falls back to fp32 and says so)")
    parser.add_argument("--device", help="where the model runs: cpu (default), cuda or cuda:N")


def device_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[torch.device]:
    """The --device asked for (None: not given), checked before any model loads; a device torch does not have is a
    usage error naming the flag."""
    if getattr(args, "device", None) is None:
        return None
    try:
        return pipeline_device(args.device)
    except ValueError as exc:
        parser.error(f"--{exc}")


def model_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> nn.Module:
    """:func:`load_model` for parsed CLI arguments; a bad model or file is a usage error naming it."""
    setup_logging()
    try:
        return load_model(args.checkpoint, args.model)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        parser.error(error_message(exc))


def expand_files(paths: Sequence[str], suffixes: Sequence[str]) -> List[str]:
    """Files as given; folders expanded to the files inside them with one of ``suffixes`` (sorted, recursive)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            files.append(str(path))
    return files


def files_or_exit(parser: argparse.ArgumentParser, paths: Sequence[str], suffixes: Sequence[str],
                  kind: str) -> List[str]:
    """:func:`expand_files` of a command's arguments; missing paths, or no ``kind`` file at all, are a usage error
    (exit 2, before the model loads)."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    files = expand_files(paths, suffixes)
    if not files:
        parser.error(f"no {kind} files found in {', '.join(paths)} (extensions: {', '.join(suffixes)})")
    return files


def image_files_or_exit(parser: argparse.ArgumentParser, paths: Sequence[str]) -> List[str]:
    """:func:`files_or_exit` for image files (folders give their images)."""
    from ..data.images import IMAGE_EXTENSIONS
    return files_or_exit(parser, paths, IMAGE_EXTENSIONS, "image")


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an image-cls", "a segment")."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def items(values: Any, what: str) -> List[Any]:
    """``values`` as a list; one str or path is a TypeError (iterating it would run each character as a file or
    text), as is a value that is no sequence at all."""
    if isinstance(values, (str, bytes, os.PathLike)) or not isinstance(values, collections.abc.Iterable):
        raise TypeError(f"{what}: expected a list, got {type(values).__name__}; pass [value] for one")
    return list(values)


def one_or_many(call: Callable[..., Dict[str, Any]]) -> Callable[..., Any]:
    """A pipeline's ``__call__`` on one input that also takes a list or tuple of inputs, as HF pipelines do: then
    a list of results, in order, the other arguments applied to each (an input is never itself a list here)."""
    @functools.wraps(call)
    def run(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, (list, tuple)):
            return [call(self, item, *args, **kwargs) for item in inputs]
        return call(self, inputs, *args, **kwargs)
    return run


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun`` in words a summary line prints: '1 image', '12 images', '2 entries'."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1] + 'ies' if noun.endswith('y') and noun[-2:-1] not in 'aeiou' else noun + 's'}"


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` reading a positive, finite ``kind`` (int or float): ``--batch-size 0`` or
    ``--max-upload-mb inf`` is a usage error naming the flag (argparse adds it), not a failure later."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def positive_count(value: Any, what: str) -> int:
    """``value`` if it is a positive int (a top-k, a batch size), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return value


def output_or_exit(parser: argparse.ArgumentParser, path: str, flag: str, folder: bool = False) -> Path:
    """:func:`intern2.checkpoint.check_output` for a CLI flag, before the work: a usage error naming it."""
    try:
        return check_output(path, flag, folder=folder)
    except ValueError as exc:
        parser.error(str(exc))


# The CLI flag of each protocol field the inference commands let a user override (the families'
# ``add_protocol_arguments``, detection's and TAL's options): a bad value is named as the user typed it.
OPTION_FLAGS = {"test_size": "--test-size", "size_divisor": "--size-divisor", "slide_crop": "--slide",
                "slide_stride": "--slide-stride", "tta": "--tta", "reduce_zero_label": "--reduce-zero-label",
                "test_clips": "--clips", "test_crops": "--crops", "sampling": "--sampling", "stride": "--stride",
                "short_side": "--short-side", "tiou": "--tiou", "default_fps": "--fps"}
_OPTION_FIELD = re.compile(r"\b(" + "|".join(OPTION_FLAGS) + r")\b")


def option_error(exc: BaseException) -> str:
    """The one-line message of a pipeline's refusal, in the CLI's words: in an error of the options given
    (:meth:`~intern2.weights._Protocol.replace`'s ``options: test_clips: ...``) each protocol field is named by
    its flag (``--clips: ...``); an error in the weights' own metadata keeps the field it is stored under."""
    message = error_message(exc)
    if not message.startswith("options: "):
        return message
    return _OPTION_FIELD.sub(lambda match: OPTION_FLAGS[match.group(1)], message[len("options: "):])


def pipeline_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, pipeline_cls: type,
                       **options: Any) -> Pipeline:
    """The family's pipeline for parsed CLI arguments; a wrong model, bad metadata or bad option is a usage
    error naming it (an option by its flag: :func:`option_error`)."""
    device = device_from_args(parser, args)
    model = model_from_args(parser, args)
    try:
        return pipeline_cls(model, source=args.checkpoint or args.model, dtype=getattr(args, "dtype", None),
                            device=device, **options)
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        parser.error(option_error(exc))


def print_topk(results: List[dict], as_json: bool) -> int:
    """Print per-file top-k results (JSON, or one line per file); errors go to stderr. Exit status: 1 when a file
    failed or none was given."""
    if as_json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr)
        elif not as_json:
            print(f"{result['file']}: " + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in result["top"]))
    return 1 if any("error" in r for r in results) or not results else 0


def unique_stems(files: Sequence[str], written_as: str = "{stem}") -> List[str]:
    """The output name (file stem) of each input; two inputs with one stem are a ValueError naming both, before
    any work (one's output would silently replace the other's)."""
    seen: Dict[str, str] = {}
    for file in files:
        stem = Path(file).stem
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {file} would both be written as {written_as.format(stem=stem)}: "
                             f"rename one, or run them into separate folders")
        seen[stem] = file
    return list(seen)


def run_on_images(files: Sequence[str], out: Path, run: Callable[[str, Any], Dict[str, Any]],
                  written_as: str) -> Tuple[List[Dict[str, Any]], bool]:
    """``run(file, image)`` for every readable image file (``out``, the folder for its outputs named
    ``written_as``, is created); an unreadable file is reported on stderr. Returns (results, whether any file
    failed)."""
    from ..data.images import load_image
    unique_stems(files, written_as)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], False
    for file in progress(files, "images"):
        try:
            image = load_image(file)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
            continue
        results.append({"file": file, **run(file, image)})
    return results, failed


def pair(text: str) -> Tuple[int, int]:
    """argparse type of ``--test-size 2048,512`` / ``--slide 512,1024`` (one number: a square): two positive
    integers."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers like 2048,512, got {text!r}")
    return values


# HF config.json model types intern2 reads -> task
_HF_TASKS = {"internimage": "image-cls", "m2m_100": "translation", "videomae": "video-cls"}


def task_of_arguments(argv: Sequence[str]) -> str:
    """--task, else the task of --model or of --checkpoint's config.json (its weights metadata, architecture or
    HF model type); image-cls when nothing says."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task")
    parser.add_argument("--model")
    parser.add_argument("--checkpoint")
    args, _ = parser.parse_known_args(list(argv))
    if args.task:
        return args.task
    if args.model:
        return task_of(args.model.partition(".")[0]) or "image-cls"
    return folder_task(args.checkpoint) or "image-cls"


def folder_task(checkpoint: Optional[str]) -> Optional[str]:
    """The task a model folder's config.json states: its weights metadata, architecture, or HF model type (an HF
    NLLB folder says only ``m2m_100``); None when it says nothing or cannot be read (loading reports that)."""
    from ..checkpoint import read_config
    if not checkpoint:
        return None
    from ..hub import local_folder
    try:  # a Hub repo's configs (loading fetches the weights after the arguments were checked)
        with local_folder(checkpoint, weights=False) as folder:
            checkpoint = str(folder)
    except (OSError, ImportError, ValueError):
        return None
    if not (Path(checkpoint) / "config.json").is_file():
        return None
    try:
        values = read_config(checkpoint)
    except (OSError, ValueError):
        return None
    cfg = values.get("pretrained_cfg")
    task = cfg.get("task") if isinstance(cfg, dict) else None
    architecture = values.get("architecture")
    return (task or (task_of(architecture) if isinstance(architecture, str) else None)
            or _HF_TASKS.get(values.get("model_type")))
