"""Datasets and loaders (images; video and text come with their tasks)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["read_text"]


def read_text(path: Path) -> str:
    """A UTF-8 text file (an annotation list, classes.txt, captions); a ValueError names the file when it is not
    UTF-8 (Python's own message names only the byte)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); save it as UTF-8") from None
