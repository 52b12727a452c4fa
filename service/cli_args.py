"""argparse value types for the command line: a bad number or path is refused while the arguments
are parsed, with the flag's name, instead of a traceback (or a written file lost) after minutes of work."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below the least allowed, {low}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (an open end excludes its bound)."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    span = f"{lo}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{hi}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (high_open and v == high):
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return v
    parse.__name__ = f"number in {span}"
    return parse


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def input_file(text: str) -> str:
    """An existing file, FIFO or device (``<(zcat det.txt.gz)``, ``/dev/stdin``), not a folder."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, a file is needed")
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def output_file(text: str) -> str:
    """A file to (over)write: not a directory; its folder exists or can be made (the command makes it)."""
    p = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name the file to write")
    _writable_below(text, p.parent)
    if p.exists() and not os.access(p, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def _writable_below(text: str, folder: Path) -> None:
    """``folder`` exists or can be made: its nearest existing ancestor is a folder we may write to."""
    existing = next((q for q in (folder, *folder.parents) if q.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable")


def made_parent(path: str) -> Path:
    """``path`` with its folder made (an ``output_file`` may name a folder that does not exist yet)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def output_dir(text: str) -> str:
    """A folder to write into (made if missing): not an existing file."""
    p = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; an output folder is needed")
    _writable_below(text, p)
    return text
