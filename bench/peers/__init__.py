"""Peer model servers for ``bench/serve.py``: KServe, MLServer and Triton (nvidia-pytriton), each in its own venv.

All serve kiln's ONNX contract (``pixels`` UINT8 [N, 28, 28] -> ``probabilities``
FP32 [N, 10], ``label`` INT64) over the KServe V2 REST protocol on a loopback port, and
open their ONNX Runtime session with ``ort_session``, i.e. ``kiln.runtime`` from this
checkout's ``src/``, from the ``SessionSettings`` JSON the bench passes: kiln's own
options. MLServer and Triton batch requests server-side (at most ``ort_session.MAX_BATCH``
rows, waiting at most ``ort_session.MAX_BATCH_DELAY_S``); KServe's ModelServer has no batcher.

Typical use (from the main venv; ``ort_json`` is ``SessionSettings(...).model_dump_json()``)::

    peer = PEERS["mlserver"]
    peer.ensure_venv(venv)                         # creates it with peer.pins when absent
    argv, env = peer.command(venv, model_onnx, port, ort_json, workdir)
    proc = peer.start(venv, model_onnx, port, ort_json, workdir, log)   # or Popen(argv, env=env)
    wait_ready(proc, f"http://127.0.0.1:{port}{peer.ready_path}")
    ...  wrk POSTs the V2 JSON body to f"http://127.0.0.1:{port}{peer.infer_path}" ...
    peer.batch_stats(port, workdir)                # BatchStats(runs, rows) so far (None: no batcher)
    stop(proc)

``python -m bench.peers --model model.onnx`` checks each peer end to end (answers
equal in-process ONNX Runtime, then a 3 s wrk smoke run with its batch sizes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ort_session

PEERS_DIR = Path(__file__).resolve().parent
MODEL_NAME = "mnist"
"""The name every peer serves the model under."""
MLSERVER_PARALLEL_WORKERS = 0
"""Inference runs in MLServer's server process, next to HTTP and the batcher. MLServer's
default (1 worker process) does not start with mlserver 1.7.1 and the uvloop it resolves
(0.23): the worker calls ``asyncio.get_event_loop()`` with no loop set and dies."""


class PeerError(RuntimeError):
    """A peer's environment or process is not usable (one line, names the peer)."""


@dataclass(frozen=True)
class BatchStats:
    runs: int
    rows: int

    @property
    def mean_rows(self) -> float:
        return self.rows / self.runs if self.runs else 0.0

    def __sub__(self, other: BatchStats) -> BatchStats:
        return BatchStats(self.runs - other.runs, self.rows - other.rows)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def settings_json(settings: str | dict[str, Any] | ort_session.SessionSettings) -> str:
    """kiln's ``SessionSettings``, validated, as the JSON every peer reads (a bad key fails
    here, before any start)."""
    return ort_session.load_settings(settings).model_dump_json()


@dataclass(frozen=True)
class Peer:
    name: str
    pins: tuple[str, ...]
    """What ``ensure_venv`` installs into a new venv (onnxruntime: the version kiln pins)."""
    default_venv: Path
    extra_versions: tuple[str, ...] = ()
    """Further packages whose versions the bench records."""
    ready_path: str = f"/v2/models/{MODEL_NAME}/ready"
    infer_path: str = f"/v2/models/{MODEL_NAME}/infer"

    @staticmethod
    def python(venv: Path) -> Path:
        return Path(venv) / "bin" / "python"

    def versions(self, venv: Path) -> dict[str, str | None]:
        """Installed versions of the pinned and recorded packages (None: not installed)."""
        names = [re.split(r"[=<>!~\[]", p)[0] for p in self.pins] + list(self.extra_versions)
        probe = ("import json, sys, importlib.metadata as m\n"
                 "def v(p):\n    try: return m.version(p)\n    except m.PackageNotFoundError: return None\n"
                 "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
        proc = subprocess.run([str(self.python(venv)), "-c", probe, *names], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerError(f"{self.name}: {self.python(venv)} does not run: {proc.stderr.strip()[-300:]}")
        return json.loads(proc.stdout)

    def ensure_venv(self, venv: Path) -> dict[str, str | None]:
        """Create ``venv`` with ``pins`` when absent (or lacking them); refuse other versions.

        Returns the installed versions (see :meth:`versions`).
        """
        venv = Path(venv)
        python = self.python(venv)
        if not python.exists():
            print(f"creating the {self.name} environment {venv} ({' '.join(self.pins)})...",
                  file=sys.stderr, flush=True)
            interpreter = shutil.which("python3.11") or sys.executable
            subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        wanted = dict(p.split("==", 1) for p in self.pins)
        versions = self.versions(venv)
        if any(versions[k] is None for k in wanted):
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *self.pins], check=True)
            versions = self.versions(venv)
        wrong = {k: versions[k] for k, v in wanted.items() if versions[k] != v}
        if wrong:
            raise PeerError(f"{self.name}: {venv} has {wrong}, the bench pins {list(self.pins)}; remove it to recreate")
        return versions

    def command(self, venv: Path, model: Path, port: int, ort_settings: str | dict[str, Any],
                workdir: Path) -> tuple[list[str], dict[str, str]]:
        """argv and environment that start the peer on ``port`` (files it needs go to ``workdir``)."""
        raise NotImplementedError

    def start(self, venv: Path, model: Path, port: int, ort_settings: str | dict[str, Any],
              workdir: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start the peer in its own process group (stdout+stderr to ``log``, default workdir/<name>.log)."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        argv, env = self.command(venv, model, port, ort_settings, workdir)
        with open(log or workdir / f"{self.name}.log", "wb") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                    start_new_session=True)

    def batch_stats(self, port: int, workdir: Path) -> BatchStats | None:
        """Model runs and rows served so far (rows / runs: the mean batch size); None: no batcher."""
        raise NotImplementedError


class MLServerPeer(Peer):
    """MLServer with ``mlserver_runtime.OnnxRuntimeModel`` and adaptive batching."""

    def command(self, venv, model, port, ort_settings, workdir):
        workdir = Path(workdir)
        model_dir = workdir / "models" / MODEL_NAME
        model_dir.mkdir(parents=True, exist_ok=True)
        server = {
            "debug": False,  # True (MLServer's default) writes an access-log line per request
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": free_port(),  # MLServer cannot turn gRPC off; it idles on a free port
            "metrics_port": free_port(),  # on, as by default, but off the bench's way
            "metrics_dir": str(workdir / "metrics"),
            "environments_dir": str(workdir / "envs"),
            "parallel_workers": MLSERVER_PARALLEL_WORKERS,
            "model_repository_root": str(workdir / "models"),
        }
        model_settings = {
            "name": MODEL_NAME,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "max_batch_size": ort_session.MAX_BATCH,
            "max_batch_time": ort_session.MAX_BATCH_DELAY_S,
            "parameters": {"uri": str(Path(model).resolve()),
                           "extra": {"session_settings": json.loads(settings_json(ort_settings))}},
        }
        (workdir / "settings.json").write_text(json.dumps(server, indent=2))
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        env = {**os.environ, "PYTHONPATH": str(PEERS_DIR)}
        return [str(Path(venv) / "bin" / "mlserver"), "start", str(workdir)], env

    def batch_stats(self, port, workdir):
        stats = json.loads(_get(f"http://127.0.0.1:{port}/kiln-peer/batch-stats"))
        return BatchStats(runs=stats["runs"], rows=stats["rows"])


class TritonPeer(Peer):
    """Triton through nvidia-pytriton (``triton_peer.py``) with its dynamic batcher."""

    def command(self, venv, model, port, ort_settings, workdir):
        python = self.python(venv)
        # The Python backend stub must load this interpreter's libpython, not the system's.
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        search = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
        env = {**os.environ, "LD_LIBRARY_PATH": search}
        argv = [str(python), str(PEERS_DIR / "triton_peer.py"), "--model", str(Path(model).resolve()),
                "--port", str(port), "--session-settings", settings_json(ort_settings)]
        return argv, env

    def batch_stats(self, port, workdir):
        stats = json.loads(_get(f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/stats"))["model_stats"]
        return BatchStats(runs=sum(s["execution_count"] for s in stats), rows=sum(s["inference_count"] for s in stats))


class KServePeer(Peer):
    """KServe's ModelServer around a custom V2 model (``kserve_onnx.py``); no batching."""

    def command(self, venv, model, port, ort_settings, workdir):
        argv = [str(self.python(venv)), str(PEERS_DIR / "kserve_onnx.py"), "--model_name", MODEL_NAME,
                "--model_path", str(Path(model).resolve()), "--session_settings", settings_json(ort_settings),
                "--http_port", str(port), "--grpc_port", str(free_port())]
        return argv, {**os.environ, "PYTHONUNBUFFERED": "1"}

    def batch_stats(self, port, workdir):
        return None


_TMP = Path(tempfile.gettempdir())
PEERS: dict[str, Peer] = {
    "kserve": KServePeer("kserve", ("kserve==0.21.0", "onnxruntime==1.31.1", "numpy==2.4.6"),
                         _TMP / "kiln-bench-kserve", extra_versions=("uvicorn", "fastapi", "pydantic")),
    "mlserver": MLServerPeer("mlserver", ("mlserver==1.7.1", "onnxruntime==1.31.1"), _TMP / "kiln-bench-mlserver",
                             extra_versions=("numpy", "uvicorn", "fastapi")),
    "triton": TritonPeer("triton", ("nvidia-pytriton==0.7.0", "onnxruntime==1.31.1"), _TMP / "kiln-bench-pytriton",
                         extra_versions=("numpy",)),
}
"""Default venvs live outside the repository, like the KServe peer's."""


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 120, log: Path | None = None) -> None:
    """Return once ``url`` answers 200; raise (with the log's tail) if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise PeerError(f"peer exited ({proc.returncode}) before {url} was ready\n{tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise PeerError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the peer's whole process group: SIGINT (both shut down cleanly on it), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers left in the group
        os.killpg(proc.pid, signal.SIGKILL)


def v2_body(pixels) -> bytes:
    """A KServe V2 JSON infer request for uint8 ``pixels`` [N, 28, 28] (what wrk sends, N=1)."""
    return json.dumps({"inputs": [{"name": ort_session.INPUT_NAME, "shape": list(pixels.shape),
                                   "datatype": "UINT8", "data": pixels.reshape(-1).tolist()}]}).encode()


def infer(base_url: str, infer_path: str, pixels) -> dict[str, Any]:
    """POST ``pixels`` as V2 JSON; the response's outputs by name (raises PeerError on non-200)."""
    req = urllib.request.Request(base_url + infer_path, data=v2_body(pixels),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise PeerError(f"{base_url}{infer_path}: {e.code} {e.read().decode(errors='replace')[:300]}") from None
    return {o["name"]: o for o in answer["outputs"]}


def check_answers(peer: Peer, base_url: str, model: Path, settings: str, rows: int = 5) -> None:
    """The peer's outputs for a batch equal in-process ONNX Runtime's (same model, same settings)."""
    pixels = np.random.default_rng(7).integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
    session = ort_session.create_session(model, ort_session.load_settings(settings))
    want_probs, want_label = ort_session.predict(session, pixels)
    outputs = infer(base_url, peer.infer_path, pixels)
    probs = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
    label = np.asarray(outputs["label"]["data"], dtype=np.int64)
    if outputs["probabilities"]["shape"] != [rows, 10] or outputs["probabilities"]["datatype"] != "FP32":
        raise PeerError(f"{peer.name}: probabilities {outputs['probabilities']['datatype']} "
                        f"{outputs['probabilities']['shape']}, expected FP32 [{rows}, 10]")
    if outputs["label"]["datatype"] != "INT64" or outputs["label"]["shape"][0] != rows:
        raise PeerError(f"{peer.name}: label {outputs['label']['datatype']} {outputs['label']['shape']}")
    # JSON carries float32 as decimal text: equal to ORT's values up to float32 rounding
    if not np.allclose(probs.reshape(rows, 10), want_probs, rtol=1e-6, atol=1e-7) or \
            not np.array_equal(label.reshape(-1), want_label):
        raise PeerError(f"{peer.name}: answers differ from in-process ONNX Runtime")
