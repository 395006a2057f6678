"""Smoke check of the bench's peer servers: ``python -m bench.peers --model model.onnx``.

``python -m bench.peers --ensure-venvs`` only creates the peers' venvs (where absent) and
exits: what CI runs before the tests, whose end-to-end peer checks never install.

For each peer: create its venv when absent, start it on a free loopback port with the
given ONNX Runtime settings, check that its answers equal in-process ONNX Runtime on the
same model and settings, then run ``wrk -t1 -c16`` for a few seconds and report the
request rate and the mean batch size the peer's server-side batcher formed. Records
nothing; ``bench/serve.py`` does the measuring. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import PEERS, Peer, PeerError, check_answers, free_port, stop, v2_body, wait_ready
from . import ort_session

DEFAULT_SETTINGS = ort_session.SessionSettings(device="cpu").model_dump_json()
"""What ``kiln serve --device cpu`` runs with (intra-op threads: the CPU quota)."""


def wrk_smoke(url: str, body: bytes, seconds: int, workdir: Path) -> float:
    """wrk -t1 -c16 for ``seconds``: requests/s (raises on socket errors or non-2xx answers)."""
    lua = workdir / "post.lua"
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   f'wrk.body = [==[{body.decode()}]==]\n')
    proc = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(lua), url],
                          capture_output=True, text=True, timeout=seconds + 30)
    if proc.returncode != 0 or "Non-2xx" in proc.stdout or "Socket errors" in proc.stdout:
        raise PeerError(f"wrk against {url} failed:\n{proc.stdout}{proc.stderr}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout).group(1))


def smoke(peer: Peer, venv: Path, model: Path, settings: str, seconds: int, workdir: Path) -> dict[str, Any]:
    versions = peer.ensure_venv(venv)
    port = free_port()
    log = workdir / f"{peer.name}.log"
    proc = peer.start(venv, model, port, settings, workdir, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base + peer.ready_path, log=log)
        check_answers(peer, base, model, settings)
        before = peer.batch_stats(port, workdir)
        image = np.random.default_rng(0).integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
        rps = wrk_smoke(base + peer.infer_path, v2_body(image), seconds, workdir)
        after = peer.batch_stats(port, workdir)
        batches = after - before if after is not None and before is not None else None  # None: no batcher
    finally:
        stop(proc)
    return {"peer": peer.name, "versions": versions, "answers_equal_in_process_ort": True,
            "wrk_c16_rps": rps, "runs": batches and batches.runs, "rows": batches and batches.rows,
            "mean_batch_rows": batches and round(batches.mean_rows, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="ONNX file following kiln's contract")
    parser.add_argument("--ensure-venvs", action="store_true", help="only create the peers' venvs")
    parser.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=sorted(PEERS))
    parser.add_argument("--session-settings", dest="ort_settings", default=DEFAULT_SETTINGS,
                        help="kiln.runtime.SessionSettings JSON (default: kiln serve --device cpu's)")
    parser.add_argument("--seconds", type=int, default=3)
    for name, peer in PEERS.items():
        parser.add_argument(f"--{name}-venv", type=Path, default=peer.default_venv)
    args = parser.parse_args()
    if args.ensure_venvs:
        for name in args.peers:
            print(json.dumps({"peer": name, "versions": PEERS[name].ensure_venv(getattr(args, f"{name}_venv"))}))
        return 0
    if args.model is None:
        parser.error("--model is required (unless --ensure-venvs)")
    failed = False
    for name in args.peers:
        with tempfile.TemporaryDirectory(prefix=f"kiln-peer-{name}-") as tmp:
            try:
                result = smoke(PEERS[name], getattr(args, f"{name}_venv"), args.model, args.ort_settings,
                               args.seconds, Path(tmp))
                print(json.dumps(result))
            except (PeerError, ort_session.SettingsError) as e:
                print(f"{name}: {e}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
