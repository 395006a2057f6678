"""Every network family, exported by kiln.export, served unchanged by the real server
with dynamic batching on, and queried with tritonclient over loopback.

The models are tiny (one epoch on 300 real digits): what is checked is the contract
and that the server's answers, every request passing through the batcher, equal
PyTorch's for each row, whatever batch it rode in.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from helpers import clean_frame, mnist_subset
from kiln.checkpoint import load_checkpoint
from kiln.export import export_onnx
from kiln.models import MODEL_TYPES, predict_proba
from kiln.serving.server import create_app
from kiln.store import ModelStore
from kiln.train import TrainConfig, train

pytestmark = pytest.mark.slow  # trains, exports and serves every family

FAMILIES = ("gru", "transformer")


@pytest.fixture(scope="module")
def family_stores(tmp_path_factory):
    """``{family: (store root, PyTorch network)}``: one store per family, its export as production."""
    images, labels = mnist_subset(30)
    train_df, val_df = clean_frame(images, labels), clean_frame(*mnist_subset(3, offset=30), prefix="v")
    out = {}
    for family in FAMILIES:
        tmp = tmp_path_factory.mktemp(f"serve-{family}")
        config = TrainConfig(model=family, epochs=1, batch_size=32, device="cpu")
        train(config, train_df, val_df, tmp / "model.pt", log=lambda _: None)
        export_onnx(tmp / "model.pt", tmp / "model.onnx", val_df, {"data_version": "md5:test"})
        store = ModelStore(tmp / "models")
        store.add_version("mnist", tmp / "model.onnx", {"model_type": family})
        store.set_alias("mnist", "1")
        out[family] = (tmp / "models", load_checkpoint(tmp / "model.pt")[1])
    return out


def merged_inferences(metrics_text: str) -> tuple[float, float]:
    """(requests, inferences) counted by the batcher's ``kiln_inference_batch_requests``
    histogram (its sum counts requests, its count the inferences they were merged into)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "kiln_inference_batch_requests":
            samples = {s.name: s.value for s in family.samples if s.labels.get("model") == "mnist"}
            return samples["kiln_inference_batch_requests_sum"], samples["kiln_inference_batch_requests_count"]
    raise AssertionError("no kiln_inference_batch_requests metric")


def test_families_under_test_are_registered() -> None:
    assert set(FAMILIES) <= set(MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_server_answers_each_family_through_the_batcher(family_stores, serve_app, family) -> None:
    root, net = family_stores[family]
    # A long queue delay lets concurrent requests merge; each row must still get its own answer.
    app = create_app(root, "mnist", intra_op_threads=1, batching=True, max_batch_size=64, max_queue_delay_us=50_000,
                     poll_interval_s=0)
    images, _ = mnist_subset(4, offset=40)
    batches = [images[i : i + 1 + i % 4] for i in range(0, 30, 3)]  # 1 to 4 rows each
    with serve_app(app) as running:
        client = triton.InferenceServerClient(running.address, concurrency=len(batches))
        try:
            assert client.is_model_ready("mnist")
            pending = []
            for pixels in batches:
                inp = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
                pending.append(client.async_infer("mnist", [inp], outputs=[
                    triton.InferRequestedOutput("probabilities", binary_data=True),
                    triton.InferRequestedOutput("label", binary_data=True)]))
            for pixels, handle in zip(batches, pending, strict=True):
                result = handle.get_result()
                expected = predict_proba(net, pixels)
                np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)
                np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
        finally:
            client.close()
        requests, inferences = merged_inferences(httpx.get(f"{running.url}/metrics").text)
    # Every request went through the batcher (whether two shared an inference depends on
    # arrival timing; tests/serving/test_batching.py covers merging itself).
    assert requests == len(batches) and 1 <= inferences <= requests
