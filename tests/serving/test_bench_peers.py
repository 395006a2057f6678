"""bench/peers: the benchmark's MLServer and Triton peers and the one module that opens their ORT sessions.

The unit tests always run. The end-to-end tests start each peer from its own venv
(``PEERS[name].default_venv``; created by ``python -m bench.peers --ensure-venvs`` or the bench,
never by a test, since that takes minutes). Without the venv they are skipped on a
developer machine and fail under CI (``CI`` set), where the bench must have created it.
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
from bench.peers.ort_session import OrtSettings, SettingsError

PEERS_DIR = Path(peers.__file__).parent
PEER_SCRIPTS = ("mlserver_runtime.py", "triton_peer.py")

KILN_LIKE = {"intra_op_num_threads": 1, "inter_op_num_threads": 1, "allow_spinning": False,
             "graph_optimization_level": "all", "execution_mode": "sequential",
             "providers": ["CPUExecutionProvider"]}


@pytest.mark.parametrize(
    ("raw", "level", "mode", "spinning"),
    [
        (KILN_LIKE, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.ExecutionMode.ORT_SEQUENTIAL, "0"),
        ({**KILN_LIKE, "intra_op_num_threads": 3, "inter_op_num_threads": 2, "allow_spinning": True,
          "graph_optimization_level": "ORT_ENABLE_BASIC", "execution_mode": "ORT_PARALLEL"},
         ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.ExecutionMode.ORT_PARALLEL, "1"),
        ({**KILN_LIKE, "graph_optimization_level": "disable"}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
         ort.ExecutionMode.ORT_SEQUENTIAL, "0"),
    ],
)
def test_settings_json_becomes_exactly_these_session_options(raw, level, mode, spinning):
    options = OrtSettings.from_json(json.dumps(raw)).session_options()
    assert options.intra_op_num_threads == raw["intra_op_num_threads"]
    assert options.inter_op_num_threads == raw["inter_op_num_threads"]
    assert options.graph_optimization_level == level
    assert options.execution_mode == mode
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == spinning


def test_settings_round_trip_through_json():
    settings = OrtSettings.from_json(json.dumps({**KILN_LIKE, "graph_optimization_level": "ORT_ENABLE_EXTENDED"}))
    assert settings.graph_optimization_level == "extended"
    assert OrtSettings.from_json(settings.to_json()) == settings
    assert peers.settings_json(json.loads(settings.to_json())) == settings.to_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"allow_spinning": None}, "missing keys ['allow_spinning']"),  # None: key dropped, never defaulted
        ({"allow_spinning": "no"}, "allow_spinning must be true or false"),
        ({"intra_op_num_threads": 0}, "intra_op_num_threads must be an integer >= 1"),
        ({"inter_op_num_threads": True}, "inter_op_num_threads must be an integer >= 1"),
        ({"graph_optimization_level": "max"}, "graph_optimization_level must be one of"),
        ({"execution_mode": "async"}, "execution_mode must be one of"),
        ({"providers": []}, "providers must be a non-empty list"),
        ({"log_severity_level": 3}, "unknown keys ['log_severity_level']"),
    ],
)
def test_bad_settings_are_one_line_errors(change, message):
    raw = {k: v for k, v in {**KILN_LIKE, **change}.items() if v is not None}
    with pytest.raises(SettingsError) as err:
        OrtSettings.from_mapping(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_that_are_not_json_or_not_an_object():
    with pytest.raises(SettingsError, match="not valid JSON"):
        OrtSettings.from_json("{intra_op_num_threads: 1")
    with pytest.raises(SettingsError, match="must be a JSON object"):
        OrtSettings.from_json("[1, 2]")


def test_session_runs_the_contract_and_refuses_what_it_cannot_honour(tmp_path, models, make_digits):
    model = models["1"].write_onnx(tmp_path / "m.onnx")
    session = ort_session.create_session(model, OrtSettings.from_mapping(KILN_LIKE))
    pixels = make_digits(4, seed=3)
    probabilities, label = ort_session.predict(session, pixels)
    want_probs, want_label = models["1"].reference(pixels)
    np.testing.assert_allclose(probabilities, want_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(label, want_label)
    with pytest.raises(ValueError, match=r"pixels must be UINT8 \[N, 28, 28\], got float32 \[4, 28, 28\]"):
        ort_session.predict(session, pixels.astype(np.float32))
    with pytest.raises(SettingsError, match="not in this onnxruntime"):
        ort_session.create_session(model, OrtSettings.from_mapping({**KILN_LIKE, "providers": ["NoSuchProvider"]}))


def _imports_and_names(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return modules, names


@pytest.mark.parametrize("script", PEER_SCRIPTS)
def test_peer_scripts_open_sessions_only_through_the_shared_module(script):
    modules, names = _imports_and_names(PEERS_DIR / script)
    assert "ort_session" in modules
    assert "create_session" in names and "OrtSettings" in names
    assert not any(m.split(".")[0] == "onnxruntime" for m in modules), f"{script} imports onnxruntime itself"
    own = {"SessionOptions", "InferenceSession", "add_session_config_entry", "intra_op_num_threads"}
    assert not own & names, f"{script} sets session options itself: {own & names}"
    # the module they import is the one tested here, not a private copy beside them
    copies = [p.name for p in PEERS_DIR.glob("*.py") if "def session_options" in p.read_text()]
    assert copies == ["ort_session.py"]


def test_mlserver_launcher_writes_batching_and_kiln_settings(tmp_path):
    model = tmp_path / "m.onnx"
    argv, env = PEERS["mlserver"].command(tmp_path / "venv", model, 18080, json.dumps(KILN_LIKE), tmp_path / "w")
    server = json.loads((tmp_path / "w" / "settings.json").read_text())
    model_settings = json.loads((tmp_path / "w" / "models" / "mnist" / "model-settings.json").read_text())
    assert argv == [str(tmp_path / "venv" / "bin" / "mlserver"), "start", str(tmp_path / "w")]
    assert env["PYTHONPATH"] == str(PEERS_DIR)
    assert (server["http_port"], server["host"], server["debug"]) == (18080, "127.0.0.1", False)
    assert len({server["http_port"], server["grpc_port"], server["metrics_port"]}) == 3
    assert model_settings["implementation"] == "mlserver_runtime.OnnxRuntimeModel"
    assert (model_settings["max_batch_size"], model_settings["max_batch_time"]) == (64, 0.0005)
    assert model_settings["parameters"]["uri"] == str(model.resolve())
    passed = model_settings["parameters"]["extra"]["ort_settings"]
    assert OrtSettings.from_mapping(passed) == OrtSettings.from_mapping(KILN_LIKE)
    with pytest.raises(SettingsError, match="missing keys"):
        PEERS["mlserver"].command(tmp_path / "venv", model, 18080, "{}", tmp_path / "w2")


def test_triton_launcher_passes_kiln_settings_and_the_interpreters_libpython(tmp_path):
    venv = Path(sys.prefix)  # any venv's python answers the LIBDIR question the same way
    argv, env = PEERS["triton"].command(venv, tmp_path / "m.onnx", 18081, dict(KILN_LIKE), tmp_path)
    probe = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    libdir = subprocess.run([str(venv / "bin" / "python"), "-c", probe],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert argv[1] == str(PEERS_DIR / "triton_peer.py")
    assert argv[argv.index("--port") + 1] == "18081"
    assert OrtSettings.from_json(argv[argv.index("--ort-settings") + 1]) == OrtSettings.from_mapping(KILN_LIKE)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == libdir


# --- end to end: each peer from its own venv ---------------------------------------------------


def _venv_or_skip(name: str) -> Path:
    venv = PEERS[name].default_venv
    if not PEERS[name].python(venv).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{venv} is missing: run `python -m bench.peers --ensure-venvs` before the tests")
        pytest.skip(f"{venv} is absent (python -m bench.peers creates it)")
    return venv


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_answers_like_in_process_ort_and_batches_concurrent_requests(name, tmp_path, models, make_digits):
    venv = _venv_or_skip(name)
    peer = PEERS[name]
    versions = peer.versions(venv)  # never installs: that is the bench's job
    assert {f"{k}=={versions[k]}" for k in (p.split("==")[0] for p in peer.pins)} == set(peer.pins)
    model = models["2"].write_onnx(tmp_path / "m.onnx")
    settings = json.dumps(KILN_LIKE)
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
        # requests of 1..4 rows at once: the batcher merges them and must hand each its own rows
        batches = [make_digits(1 + i % 4, seed=100 + i) for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda px: peers.infer(base, peer.infer_path, px), batches))
        for pixels, outputs in zip(batches, answers):
            want_probs, want_label = models["2"].reference(pixels)
            np.testing.assert_array_equal(np.asarray(outputs["label"]["data"]), want_label)
            np.testing.assert_allclose(np.asarray(outputs["probabilities"]["data"], np.float32).reshape(-1, 10),
                                       want_probs, rtol=1e-4, atol=1e-6)
        served = peer.batch_stats(port, tmp_path / "work") - before
        assert served.rows == sum(len(b) for b in batches)
        assert 1 <= served.runs <= len(batches)
    finally:
        peers.stop(proc)
    assert proc.poll() is not None
