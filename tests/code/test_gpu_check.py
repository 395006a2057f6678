"""bench/gpu_check.py where no GPU exists (the case this machine and CI are): one clear
line, a distinct exit code, and no results file pretending to be a check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # trains and exports a model


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: run `make gpu-check` itself")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("gpu-check: skipped, no CUDA GPU visible")
    assert not out.exists()
