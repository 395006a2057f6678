"""bench/peers: the benchmark's KServe, MLServer and Triton peers and the one module that opens their ORT sessions.

The unit tests always run. The tests marked ``bench`` start each peer from its own venv
(``PEERS[name].default_venv``; created by ``python -m bench.peers --ensure-venvs``, never by
a test, since that takes minutes). ``make test`` deselects them by that marker (the peers
are the benchmark's, not kiln's); ``make test-bench`` creates the venvs and runs them. Run
by hand without their venv, they fail with what to run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import peers
from bench.peers import PEERS, ort_session
from bench.peers.ort_session import SettingsError
from kiln.runtime import SessionSettings
from kiln.serving.config import ServerSettings
from kiln.serving.predictor import OnnxPredictor
from kiln.store import ModelStore

PEERS_DIR = Path(peers.__file__).parent
PEER_SCRIPTS = ("kserve_onnx.py", "mlserver_runtime.py", "triton_peer.py")

KILN = SessionSettings(device="cpu", intra_op_threads=1)
"""What the end-to-end tests hand the peers."""
KILN_LIKE = KILN.model_dump_json()


def _options(session) -> dict:
    o = session.get_session_options()
    return {"intra": o.intra_op_num_threads, "inter": o.inter_op_num_threads, "level": o.graph_optimization_level,
            "mode": o.execution_mode, "spin": o.get_session_config_entry("session.intra_op.allow_spinning"),
            "providers": session.get_providers()}


@pytest.mark.parametrize(
    "settings",
    [SessionSettings(device="cpu"),  # what kiln serve --device cpu runs with
     SessionSettings(device="cpu", intra_op_threads=3, inter_op_threads=2, allow_spinning=True,
                     graph_optimization="basic")],
)
def test_peers_and_kiln_serve_open_sessions_with_the_same_options(settings, tmp_path, models):
    """The settings JSON each peer gets turns, in ort_session, into the session kiln's server opens."""
    passed = peers.settings_json(settings)
    assert ort_session.load_settings(passed) == settings
    store = ModelStore(tmp_path / "store")
    version = store.add_version("mnist", models["1"].write_onnx(tmp_path / "m.onnx"), {})
    served = OnnxPredictor(version, session=settings)
    served.load()
    peer_session = ort_session.create_session(version.onnx_path, ort_session.load_settings(passed))
    assert _options(peer_session) == _options(served._session)
    want = {"intra_op_num_threads": settings.intra_op_threads, "inter_op_num_threads": settings.inter_op_threads,
            "allow_spinning": settings.allow_spinning, "providers": ["CPUExecutionProvider"]}
    assert want.items() <= ort_session.describe(settings).items()
    # and what the bench hands over is what `kiln serve --device cpu` builds for itself
    assert ServerSettings(device="cpu").session_settings() == SessionSettings(device="cpu")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"allow_spinning": "sometimes"}', "allow_spinning"),
        ('{"intra_op_threads": 0}', "intra_op_threads"),
        ('{"graph_optimization": "max"}', "graph_optimization"),
        ('{"intra_op_num_threads": 2}', "intra_op_num_threads: Extra inputs are not permitted"),  # the old schema
        ("{intra_op_threads: 1", "settings"),
    ],
)
def test_bad_settings_are_one_line_errors(raw, message):
    with pytest.raises(SettingsError) as err:
        ort_session.load_settings(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_session_runs_the_contract_and_refuses_what_it_cannot_honour(tmp_path, models, make_digits):
    model = models["1"].write_onnx(tmp_path / "m.onnx")
    session = ort_session.create_session(model, KILN)
    pixels = make_digits(4, seed=3)
    probabilities, label = ort_session.predict(session, pixels)
    want_probs, want_label = models["1"].reference(pixels)
    np.testing.assert_allclose(probabilities, want_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(label, want_label)
    with pytest.raises(ValueError, match=r"pixels must be uint8 \[N, 28, 28\], got float32"):
        ort_session.predict(session, pixels.astype(np.float32))
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not Path("/proc/driver/nvidia/gpus").exists():
        with pytest.raises(SettingsError, match="CUDAExecutionProvider is not usable"):
            ort_session.create_session(model, SessionSettings(device="cuda", intra_op_threads=1))


def _imports_and_names(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return modules, names


@pytest.mark.parametrize("script", PEER_SCRIPTS)
def test_peer_scripts_open_sessions_only_through_kiln_runtime(script):
    modules, names = _imports_and_names(PEERS_DIR / script)
    assert "ort_session" in modules
    assert {"create_session", "load_settings"} <= names
    assert not any(m.split(".")[0] == "onnxruntime" for m in modules), f"{script} imports onnxruntime itself"
    own = {"SessionOptions", "InferenceSession", "add_session_config_entry", "intra_op_num_threads"}
    assert not own & names, f"{script} sets session options itself: {own & names}"
    # ort_session maps nothing itself: the one mapping is kiln.runtime.SessionSettings.session_options
    modules, names = _imports_and_names(PEERS_DIR / "ort_session.py")
    assert "kiln.runtime" in modules and "onnxruntime" not in modules
    assert not {"SessionOptions", "InferenceSession", "add_session_config_entry"} & names


@pytest.mark.bench
@pytest.mark.parametrize("name", sorted(PEERS))
def test_each_peer_venv_reads_the_settings_as_kiln_does(name):
    """In the peer's own interpreter (no kiln installed), ort_session resolves the settings
    JSON to the same ONNX Runtime options as here."""
    venv = _venv_or_fail(name)
    settings = SessionSettings(device="cpu", intra_op_threads=3, allow_spinning=True, graph_optimization="extended")
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); import ort_session; "
             "print(json.dumps(ort_session.describe(ort_session.load_settings(sys.argv[2]))))")
    proc = subprocess.run([str(PEERS[name].python(venv)), "-c", probe, str(PEERS_DIR), settings.model_dump_json()],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ort_session.describe(settings)


def test_launchers_hand_every_peer_kiln_settings(tmp_path):
    model = tmp_path / "m.onnx"
    argv, env = PEERS["mlserver"].command(tmp_path / "venv", model, 18080, KILN_LIKE, tmp_path / "w")
    server = json.loads((tmp_path / "w" / "settings.json").read_text())
    model_settings = json.loads((tmp_path / "w" / "models" / "mnist" / "model-settings.json").read_text())
    assert argv == [str(tmp_path / "venv" / "bin" / "mlserver"), "start", str(tmp_path / "w")]
    assert env["PYTHONPATH"] == str(PEERS_DIR)
    assert (server["http_port"], server["host"], server["debug"]) == (18080, "127.0.0.1", False)
    assert len({server["http_port"], server["grpc_port"], server["metrics_port"]}) == 3
    assert model_settings["implementation"] == "mlserver_runtime.OnnxRuntimeModel"
    assert (model_settings["max_batch_size"], model_settings["max_batch_time"]) == (64, 0.0005)
    assert model_settings["parameters"]["uri"] == str(model.resolve())
    assert ort_session.load_settings(model_settings["parameters"]["extra"]["session_settings"]) == KILN
    with pytest.raises(SettingsError, match="Extra inputs"):
        PEERS["mlserver"].command(tmp_path / "venv", model, 18080, '{"x": 1}', tmp_path / "w2")

    argv, _ = PEERS["kserve"].command(tmp_path / "venv", model, 18082, KILN, tmp_path)
    assert argv[1] == str(PEERS_DIR / "kserve_onnx.py")
    assert ort_session.load_settings(argv[argv.index("--session_settings") + 1]) == KILN
    assert argv[argv.index("--http_port") + 1] == "18082"


def test_triton_launcher_passes_kiln_settings_and_the_interpreters_libpython(tmp_path):
    venv = Path(sys.prefix)  # any venv's python answers the LIBDIR question the same way
    argv, env = PEERS["triton"].command(venv, tmp_path / "m.onnx", 18081, KILN.model_dump(), tmp_path)
    probe = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    libdir = subprocess.run([str(venv / "bin" / "python"), "-c", probe],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert argv[1] == str(PEERS_DIR / "triton_peer.py")
    assert argv[argv.index("--port") + 1] == "18081"
    assert ort_session.load_settings(argv[argv.index("--session-settings") + 1]) == KILN
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == libdir


# --- end to end: each peer from its own venv ---------------------------------------------------


def _venv_or_fail(name: str) -> Path:
    venv = PEERS[name].default_venv
    if not PEERS[name].python(venv).exists():
        pytest.fail(f"{venv} is missing: run `make test-bench` (or `python -m bench.peers --ensure-venvs`) first")
    return venv


@pytest.mark.bench
@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_answers_like_in_process_ort_and_batches_concurrent_requests(name, tmp_path, models, make_digits):
    venv = _venv_or_fail(name)
    peer = PEERS[name]
    versions = peer.versions(venv)  # never installs: that is the bench's job
    assert {f"{k}=={versions[k]}" for k in (p.split("==")[0] for p in peer.pins)} == set(peer.pins)
    model = models["2"].write_onnx(tmp_path / "m.onnx")
    settings = KILN_LIKE
    port = peers.free_port()
    log = tmp_path / f"{name}.log"
    proc = peer.start(venv, model, port, settings, tmp_path / "work", log)
    base = f"http://127.0.0.1:{port}"
    try:
        peers.wait_ready(proc, base + peer.ready_path, log=log)
        peers.check_answers(peer, base, model, settings)
        if name == "triton":  # the batcher as Triton itself reports it
            config = json.loads(urllib.request.urlopen(f"{base}/v2/models/mnist/config", timeout=10).read())
            assert config["max_batch_size"] == 64
            assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
        before = peer.batch_stats(port, tmp_path / "work")
        batching = before is not None
        # requests of 1..4 rows at once: the batcher merges them and must hand each its own rows
        batches = [make_digits(1 + i % 4, seed=100 + i) for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda px: peers.infer(base, peer.infer_path, px), batches))
        for pixels, outputs in zip(batches, answers):
            want_probs, want_label = models["2"].reference(pixels)
            np.testing.assert_array_equal(np.asarray(outputs["label"]["data"]), want_label)
            np.testing.assert_allclose(np.asarray(outputs["probabilities"]["data"], np.float32).reshape(-1, 10),
                                       want_probs, rtol=1e-4, atol=1e-6)
        if batching:
            served = peer.batch_stats(port, tmp_path / "work") - before
            assert served.rows == sum(len(b) for b in batches)
            assert 1 <= served.runs <= len(batches)
    finally:
        peers.stop(proc)
    assert proc.poll() is not None
