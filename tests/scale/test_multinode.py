"""Real multi-node DDP on one machine: two torchrun node processes (``--nnodes 2
--nproc-per-node 1``) meeting by c10d rendezvous on loopback, gloo, each running the
command a TrainJob node runs. The checkpoint equals the single-process one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO_ROOT
from kiln.train import TrainConfig, read_checkpoint, weights_sha256
from kiln.trainjob import JobPaths, trainer_command
import pytest

pytestmark = pytest.mark.slow  # two torchrun node processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_c10d_rendezvous_match_one_process(tiny_tables, tiny_overrides, reference_state, tmp_path: Path) -> None:
    paths = JobPaths.under(tmp_path, "kiln-train-c10d")
    paths.root.mkdir(parents=True)
    paths.train.write_bytes(tiny_tables[0].read_bytes())
    paths.val.write_bytes(tiny_tables[1].read_bytes())
    command = trainer_command(paths, TrainConfig(**tiny_overrides))
    assert command[0] == "torchrun"
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "kiln-c10d"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    nodes = [subprocess.Popen(launcher + command[1:], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    result = json.loads(paths.result.read_text())  # rank 0's
    assert result["world_size"] == 2 and result["rank"] == 0
    state = read_checkpoint(paths.checkpoint)["state_dict"]
    assert weights_sha256(state) == result["weights_sha256"]
    assert list(state) == list(reference_state)  # no "module." prefix from DDP
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, atol=1e-4, rtol=1e-4)
    # one of the two processes logged as rank 0 with the whole world
    assert sum("world_size=2" in output for output in outputs) == 1
