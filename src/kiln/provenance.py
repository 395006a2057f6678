"""Where a model came from: the code version, for the lineage export and deploy record."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(cwd: str | Path | None = None) -> str:
    """The code version: ``KILN_GIT_COMMIT`` (baked into images) or ``git rev-parse HEAD``.

    Returns "unknown" outside a git checkout rather than failing a deployment over it.
    """
    env = os.environ.get("KILN_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


__all__ = ["git_commit"]
