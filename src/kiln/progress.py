"""Structured progress lines from a pipeline step to the process that runs it.

A step's output reaches ``kiln run`` through a pipe (kfp.local streams it), where a tqdm
bar turns itself off; so a step prints one line per unit of progress instead::

    KILN-PROGRESS {"step": "train", "n": 3, "of": 10, "unit": "epoch", "loss": 0.12}

and the parent renders it (a progress bar on a terminal). On a cluster the lines are
plain log lines. Keys: ``step``, ``n`` (done so far), ``of`` (total), ``unit``; anything
else is shown next to the bar.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

PREFIX = "KILN-PROGRESS "


def emit(step: str, n: int, of: int, unit: str = "epoch", file: TextIO | None = None, **fields: Any) -> None:
    """Print one progress line for ``step`` (``n`` of ``of`` ``unit``s done) and flush it."""
    record = {"step": step, "n": int(n), "of": int(of), "unit": unit, **fields}
    print(PREFIX + json.dumps(record, default=float, sort_keys=True), file=file or sys.stdout, flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The record of a progress line (leading whitespace allowed), or None for any other
    line, a malformed one included: progress is never worth failing a run over."""
    text = line.strip()
    if not text.startswith(PREFIX):
        return None
    try:
        record = json.loads(text[len(PREFIX):])
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"step", "n", "of"} <= record.keys():
        return None
    return record


__all__ = ["PREFIX", "emit", "parse"]
