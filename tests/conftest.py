"""Shared test helpers: golden fixtures from ../shared/fixtures, Triton interpreter on CPU-only machines."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; the flag is read when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never reach the network, and never read the developer's Hugging Face cache: the Hub code runs offline
# against caches the tests build (huggingface_hub reads both variables when it is imported, after this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="intern2-test-hf-cache-")

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


HUB_COMMIT = "4c3e7a1f" * 5


def hub_path(cache: Path, repo: str, filename: str = "") -> Path:
    """Where huggingface_hub keeps ``filename`` of ``repo`` at its main revision (refs/main -> snapshot): tests
    build Hub caches offline with it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    path = root / "snapshots" / HUB_COMMIT / filename
    (path.parent if filename else path).mkdir(parents=True, exist_ok=True)
    return path


def fixture_path(*parts: str) -> Path:
    """Path inside ../shared/fixtures, skipping the test when the fixtures are not checked out."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"golden fixture {path} not present (../shared/fixtures is outside this repository)")
    return path


def load_fixture(name: str):
    """(json metadata or None, tensors) of ../shared/fixtures/<name>.{json,safetensors}."""
    from safetensors.torch import load_file
    tensors = load_file(str(fixture_path(f"{name}.safetensors")))
    meta_path = FIXTURES / f"{name}.json"
    return (json.loads(meta_path.read_text()) if meta_path.exists() else None), tensors


def fixture_cases(name: str, key: str, only: Optional[Iterable[str]] = None) -> list:
    """Case list of a fixture's JSON for parametrisation, optionally only the cases whose "name" is in ``only``.

    When the fixtures are absent this returns one skipped placeholder, so the tests report a skip, not nothing.
    """
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not present"))]
    cases = json.loads(path.read_text())[key]
    return [c for c in cases if only is None or c["name"] in only]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
