"""The model store as other readers see it: world-readable modes whatever the writer's
umask, and a valid Triton model repository whose version policy follows ``production``."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format

import tritonclient
from contract_model import weights, write_contract_onnx
from kiln.deploy import deploy
from kiln.store import ModelStore, triton_config


def model_config_proto():
    """Triton's ModelConfig message, from the .py tritonclient ships (its grpc package
    __init__ needs grpcio, which the HTTP client does not install)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.fixture()
def umask_077():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_deploy_under_a_private_umask_leaves_everything_readable(tmp_path: Path, umask_077) -> None:
    onnx_file = write_contract_onnx(tmp_path / "m.onnx", weights())
    clean = tmp_path / "clean.parquet"
    import pandas as pd

    pd.DataFrame({"id": ["a", "b"], "label": ["1", "2"], "pixels": [bytes(784), bytes(range(256)) * 3 + bytes(16)],
                  "sha256": ["0" * 64, "1" * 64]}).to_parquet(clean)
    version = deploy(onnx_file, tmp_path / "store", "mnist", {"data_version": "x"}, reference_clean_path=clean)
    model_dir = tmp_path / "store" / "mnist"
    assert mode(version.path) == 0o755 and mode(model_dir) == 0o755
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.onnx", "model.json", "stats.parquet", "production", "config.pbtxt"}
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o644) for p in files}
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_store_is_a_triton_repository_following_production(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    onnx_file = write_contract_onnx(tmp_path / "m.onnx", weights())
    for _ in range(3):
        store.add_version("mnist", onnx_file, {})
    ModelConfig = model_config_proto()
    config_path = tmp_path / "store" / "mnist" / "config.pbtxt"
    for version in ("2", "3", "1"):  # promote, promote, roll back
        store.set_alias("mnist", version)
        # Parse strictly: an unknown field or a misspelt enum raises ParseError.
        config = text_format.Parse(config_path.read_text(), ModelConfig())
        assert list(config.version_policy.specific.versions) == [int(version)]
    assert config.name == "mnist" and config.platform == "onnxruntime_onnx"
    # Triton's layout: <model>/<numeric version>/model.onnx for every version.
    assert all((tmp_path / "store" / "mnist" / v / "model.onnx").is_file() for v in store.versions("mnist"))
    # The declared tensors are the ONNX graph's (names, element types, non-batch dims).
    graph = onnx.load(str(onnx_file)).graph
    onnx_type = {"TYPE_UINT8": onnx.TensorProto.UINT8, "TYPE_FP32": onnx.TensorProto.FLOAT,
                 "TYPE_INT64": onnx.TensorProto.INT64}
    dtype_enum = ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type

    def data_type_name(number: int) -> str:
        return dtype_enum.values_by_number[number].name

    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, g in zip(declared, actual):
            assert onnx_type[data_type_name(t.data_type)] == g.type.tensor_type.elem_type
            dims = [d.dim_value for d in g.type.tensor_type.shape.dim[1:]]
            assert list(t.reshape.shape if t.HasField("reshape") else t.dims) == dims


def test_triton_config_refuses_a_non_numeric_version() -> None:
    with pytest.raises(ValueError):
        triton_config("mnist", "latest")
