"""kiln.runtime: the one ONNX Runtime path (settings, device, contract) and who builds sessions from it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from helpers import REPO_ROOT
from kiln.runtime import (
    ContractError,
    SessionError,
    SessionSettings,
    cpu_quota,
    create_session,
    predict,
    providers_for,
    run_contract,
)
from kiln.serving.predictor import OnnxPredictor
from kiln.serving.server import parse_args
from kiln.store import ModelStore

MODEL = "mnist"
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(session: ort.InferenceSession) -> dict[str, object]:
    """What decides how ``session`` runs, read back from ONNX Runtime itself."""
    o = session.get_session_options()
    return {
        "providers": session.get_providers(),
        "intra_op": o.intra_op_num_threads,
        "inter_op": o.inter_op_num_threads,
        "mode": o.execution_mode,
        "graph": o.graph_optimization_level,
        "spinning": o.get_session_config_entry("session.intra_op.allow_spinning"),
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("max 100000\n", os.cpu_count()),
        ("100000 100000\n", 1),
        ("150000 100000\n", min(2, os.cpu_count() or 1)),
        ("1000 100000\n", 1),  # a fraction of a CPU still needs one thread
        ("garbage\n", os.cpu_count()),
    ],
)
def test_cpu_quota_reads_cgroup_cpu_max(tmp_path: Path, content: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(content)
    assert cpu_quota(path) == expected


def test_cpu_quota_without_cgroup_file_is_the_cpu_count(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "absent") == os.cpu_count()


def test_cuda_is_requested_when_the_driver_sees_a_gpu_or_the_deployment_says_so(tmp_path: Path) -> None:
    assert providers_for("auto", tmp_path / "no-driver") == CPU
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    assert providers_for("auto", gpus) == CPU  # driver loaded, no GPU
    (gpus / "0000:00:1e.0").mkdir()
    assert providers_for("auto", gpus) == CUDA
    assert SessionSettings(device="auto").providers(gpus) == CUDA
    assert providers_for("cpu", gpus) == CPU
    assert providers_for(" CUDA ", tmp_path / "no-driver") == CUDA
    with pytest.raises(ValueError, match="KILN_DEVICE must be auto, cuda or cpu, got 'tpu'"):
        providers_for("tpu")
    with pytest.raises(ValidationError):
        SessionSettings(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SessionSettings(intra_op_threads=0)


def test_session_settings_reach_onnx_runtime_and_survive_json(store_root: Path) -> None:
    path = ModelStore(store_root).get(MODEL, "1").onnx_path
    assert SessionSettings().intra_op_threads == cpu_quota()  # the server's default pool size
    served = _options(create_session(path, SessionSettings(device="cpu", intra_op_threads=1)))
    assert served == {"providers": CPU, "intra_op": 1, "inter_op": 1, "mode": ort.ExecutionMode.ORT_SEQUENTIAL,
                      "graph": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "spinning": "0"}
    other = SessionSettings(device="cpu", intra_op_threads=2, allow_spinning=True, graph_optimization="basic")
    assert SessionSettings.model_validate_json(other.model_dump_json()) == other
    assert _options(create_session(path.read_bytes(), other)) == {
        "providers": CPU, "intra_op": 2, "inter_op": 1, "mode": ort.ExecutionMode.ORT_SEQUENTIAL,
        "graph": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "spinning": "1"}


def test_the_bench_peer_and_kiln_serve_build_their_sessions_from_the_same_settings(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)  # bench/serve.py starts kiln serve without them
    bench = _load(REPO_ROOT / "bench" / "serve.py")
    peer = _load(REPO_ROOT / "bench" / "peers" / "ort_session.py")  # what every peer script opens sessions with
    handed_to_peers = bench.kiln_session_settings()
    cmd = bench.kiln_cmd(store_root, MODEL, 8080, True)
    served_settings, _, _ = parse_args(cmd[cmd.index("serve") + 1 :])
    assert served_settings.session_settings() == handed_to_peers
    # And the sessions they open agree, read back from ONNX Runtime.
    version = ModelStore(store_root).get(MODEL, "1")
    kiln = OnnxPredictor(version, session=served_settings.session_settings())
    kiln.load()
    peer_session = peer.create_session(version.onnx_path, peer.load_settings(handed_to_peers.model_dump_json()))
    assert _options(peer_session) == _options(kiln._session)
    assert _options(peer_session)["spinning"] == "0" and _options(peer_session)["intra_op"] == cpu_quota()


def test_predict_follows_the_contract_and_matches_the_reference(store_root: Path, models, make_digits) -> None:
    path = ModelStore(store_root).get(MODEL, "2").onnx_path
    pixels = make_digits(5)
    probabilities, label = predict(path, pixels, SessionSettings(device="cpu", intra_op_threads=1), batch_size=2)
    expected_p, expected_label = models["2"].reference(pixels)
    np.testing.assert_allclose(probabilities, expected_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(label, expected_label)
    assert predict(path, make_digits(0))[1].shape == (0,)
    with pytest.raises(ContractError, match="pixels must be uint8"):
        predict(path, pixels.astype(np.float32))
    with pytest.raises(SessionError, match="not found"):
        predict(path.parent / "absent.onnx", pixels)


def test_a_model_off_the_contract_is_refused(tmp_path: Path, store_root: Path, make_digits) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["probabilities"])],
        "identity",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.UINT8, ["N", 28, 28])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "identity.onnx")
    with pytest.raises(ContractError, match="the contract wants"):
        predict(tmp_path / "identity.onnx", make_digits(1))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(SessionError, match="cannot load") as info:
        create_session(tmp_path / "junk.onnx")
    assert info.value.__cause__ is not None
    session = create_session(ModelStore(store_root).get(MODEL, "1").onnx_path, SessionSettings(intra_op_threads=1))
    with pytest.raises(ContractError, match=r"pixels must be uint8 \[N, 28, 28\]"):
        run_contract(session, make_digits(1).reshape(1, 784))


def test_serving_and_runtime_import_without_training_dependencies() -> None:
    # The serve image has no torch, GX, DVC or kfp: importing the server must not need them.
    code = (
        "import sys, kiln.runtime, kiln.serving.server, kiln.serving.cli\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'great_expectations', 'dvc', 'kfp'})\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
