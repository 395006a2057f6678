"""Dynamic batching: concurrent requests merged into one inference, each answered on its own."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from kiln.serving.batching import Batcher
from kiln.serving.predictor import InferenceInputError
from kiln.serving.server import create_app

MODEL = "mnist"


def histogram(text: str, name: str, **labels: str) -> dict[str, float]:
    """``{le: cumulative count, "count": n, "sum": s}`` of one labelled histogram."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            own = {k: v for k, v in sample.labels.items() if k != "le"}
            if own != labels:
                continue
            if sample.name.endswith("_bucket"):
                out[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_count"):
                out["count"] = sample.value
            elif sample.name.endswith("_sum"):
                out["sum"] = sample.value
    return out


def body(pixels: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}]}
    ).encode()


async def fire(url: str, batches: list[np.ndarray], path: str = f"/v2/models/{MODEL}/infer") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(batches))
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, content=body(b)) for b in batches))


def outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


@pytest.fixture(scope="module")
def batching_server(store_root, serve_app):
    # A long queue delay makes merging certain rather than likely.
    app = create_app(store_root, MODEL, intra_op_threads=1, max_batch_size=64, max_queue_delay_us=50_000, poll_interval_s=0)
    with serve_app(app) as running:
        yield running


def test_concurrent_requests_are_merged_and_split_back(batching_server, models, make_digits) -> None:
    # Different row counts per request, so a wrong split shows up as a shape or value error.
    batches = [make_digits(1 + i % 3, seed=200 + i) for i in range(24)]
    responses = asyncio.run(fire(batching_server.url, batches))
    for pixels, response in zip(batches, responses, strict=True):
        assert response.status_code == 200, response.text
        got = outputs(response)
        probs, labels = models["1"].reference(pixels)
        np.testing.assert_array_equal(got["label"], labels)
        np.testing.assert_allclose(got["probabilities"], probs, rtol=1e-4, atol=1e-6)

    text = httpx.get(f"{batching_server.url}/metrics").text
    per_batch = histogram(text, "kiln_inference_batch_requests", model=MODEL, version="1")
    rows = histogram(text, "kiln_inference_batch_size", model=MODEL, version="1")
    # 24 requests ran in fewer inferences than requests, and some inference merged several.
    assert per_batch["sum"] == 24
    assert per_batch["count"] < 24
    assert per_batch["1.0"] < per_batch["count"]
    assert rows["sum"] == sum(len(b) for b in batches)
    assert histogram(text, "kiln_inference_queue_duration_seconds", model=MODEL, version="1")["count"] == 24
    assert histogram(text, "kiln_inference_compute_duration_seconds", model=MODEL, version="1")["count"] == per_batch["count"]


def test_batches_never_exceed_max_batch_size(store_root, serve_app, make_digits, models) -> None:
    app = create_app(store_root, MODEL, intra_op_threads=1, max_batch_size=4, max_queue_delay_us=50_000, poll_interval_s=0)
    batches = [make_digits(1, seed=300 + i) for i in range(16)] + [make_digits(7, seed=400)]
    with serve_app(app) as running:
        responses = asyncio.run(fire(running.url, batches))
        text = httpx.get(f"{running.url}/metrics").text
    assert [r.status_code for r in responses] == [200] * len(batches)
    for pixels, response in zip(batches, responses, strict=True):
        np.testing.assert_array_equal(outputs(response)["label"], models["1"].reference(pixels)[1])
    rows = histogram(text, "kiln_inference_batch_size", model=MODEL, version="1")
    # Every merged batch holds at most 4 rows; the 7-row request runs alone (never split, never refused).
    assert rows["sum"] == 23
    assert rows["4.0"] == rows["count"] - 1
    requests = histogram(text, "kiln_inference_batch_requests", model=MODEL, version="1")
    assert requests["1.0"] < requests["count"]  # merging happened


def test_batching_off_runs_every_request_alone(store_root, serve_app, make_digits, models) -> None:
    app = create_app(store_root, MODEL, intra_op_threads=1, batching=False, poll_interval_s=0)
    batches = [make_digits(2, seed=500 + i) for i in range(16)]
    with serve_app(app) as running:
        responses = asyncio.run(fire(running.url, batches))
        text = httpx.get(f"{running.url}/metrics").text
    for pixels, response in zip(batches, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(outputs(response)["label"], models["1"].reference(pixels)[1])
    requests = histogram(text, "kiln_inference_batch_requests", model=MODEL, version="1")
    assert requests["count"] == 16 and requests["1.0"] == 16


def test_a_bad_request_does_not_spoil_its_batch(batching_server, make_digits, models) -> None:
    good = [make_digits(2, seed=600 + i) for i in range(6)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=batching_server.url, timeout=20) as client:
            bad = {"inputs": [{"name": "pixels", "shape": [1, 28, 27], "datatype": "UINT8", "data": [0] * (28 * 27)}]}
            path = f"/v2/models/{MODEL}/infer"
            return await asyncio.gather(
                client.post(path, json=bad), *(client.post(path, content=body(b)) for b in good)
            )

    bad_response, *responses = asyncio.run(run())
    assert bad_response.status_code == 400
    for pixels, response in zip(good, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(outputs(response)["label"], models["1"].reference(pixels)[1])


def test_tritonclient_concurrent_binary_requests_through_the_batcher(batching_server, models, make_digits) -> None:
    client = triton.InferenceServerClient(batching_server.address, concurrency=8)
    try:
        batches = [make_digits(3, seed=700 + i) for i in range(8)]
        pending = []
        for pixels in batches:
            inp = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
            pending.append(client.async_infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("label")]))
        for pixels, handle in zip(batches, pending, strict=True):
            np.testing.assert_array_equal(handle.get_result().as_numpy("label"), models["1"].reference(pixels)[1])
    finally:
        client.close()


# --- the Batcher on its own ---------------------------------------------------------------------


class FakePredictor:
    """Doubles its input; a batch holding the poison value 13 fails, as ONNX Runtime might."""

    name, version, batchable = "fake", "1", True

    def __init__(self) -> None:
        self.runs: list[int] = []

    def run(self, feed, output_names=None):
        x = feed["x"]
        self.runs.append(len(x))
        if (x == 13).any():
            raise InferenceInputError("poison")
        return {"y": x * 2, "n": np.arange(len(x))}


def test_batcher_merges_splits_and_isolates_a_failing_request() -> None:
    predictor = FakePredictor()
    observed: list[tuple[int, int]] = []

    async def run():
        with ThreadPoolExecutor(2) as executor:
            batcher = Batcher(predictor, executor, max_batch_size=64, max_queue_delay_s=0.05,
                              observe=lambda r, n, _: observed.append((r, n)))
            feeds = [{"x": np.full((i % 3 + 1, 2), i, dtype=np.int64)} for i in range(12)]
            results = await asyncio.gather(*(batcher.infer(f) for f in feeds), return_exceptions=True)
            await batcher.close()
            return feeds, results

    feeds, results = asyncio.run(run())
    for feed, result in zip(feeds, results, strict=True):
        assert not isinstance(result, Exception)
        np.testing.assert_array_equal(result.outputs["y"], feed["x"] * 2)
        assert result.outputs["n"].shape == (len(feed["x"]),)
    # all 12 requests merged into one run: nothing was poisoned
    assert predictor.runs == [sum(len(f["x"]) for f in feeds)]
    assert observed == [(12, predictor.runs[0])]

    predictor.runs.clear()

    async def poisoned():
        with ThreadPoolExecutor(2) as executor:
            batcher = Batcher(predictor, executor, max_batch_size=64, max_queue_delay_s=0.05)
            feeds = [{"x": np.full((1, 2), v, dtype=np.int64)} for v in (1, 13, 2)]
            return await asyncio.gather(*(batcher.infer(f) for f in feeds), return_exceptions=True)

    ok1, bad, ok2 = asyncio.run(poisoned())
    assert isinstance(bad, InferenceInputError)
    np.testing.assert_array_equal(ok1.outputs["y"], [[2, 2]])
    np.testing.assert_array_equal(ok2.outputs["y"], [[4, 4]])
    assert predictor.runs == [3, 1, 1, 1]  # the merged run failed, then one by one


def test_batcher_keeps_incompatible_shapes_apart_and_respects_the_row_limit() -> None:
    predictor = FakePredictor()

    async def run():
        with ThreadPoolExecutor(2) as executor:
            batcher = Batcher(predictor, executor, max_batch_size=4, max_queue_delay_s=0.05)
            feeds = [{"x": np.ones((1, 2), np.int64)}] * 6 + [{"x": np.ones((1, 3), np.int64)}] * 2
            return await asyncio.gather(*(batcher.infer(f) for f in feeds))

    results = asyncio.run(run())
    assert [r.outputs["y"].shape for r in results] == [(1, 2)] * 6 + [(1, 3)] * 2
    assert sorted(predictor.runs) == [2, 2, 4]


@pytest.mark.load
def test_a_lone_request_does_not_wait_for_the_queue_delay() -> None:
    # A one-second delay would show in queue_s if an idle batcher held the batch open.
    predictor = FakePredictor()

    async def run():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(predictor, executor, max_batch_size=64, max_queue_delay_s=1.0)
            return [await batcher.infer({"x": np.ones((1, 2), np.int64)}) for _ in range(3)]

    results = asyncio.run(run())
    assert predictor.runs == [1, 1, 1]
    assert all(r.queue_s < 0.5 for r in results), [r.queue_s for r in results]


@pytest.mark.load
def test_the_batch_waits_for_an_announced_request_and_no_longer_than_the_delay() -> None:
    predictor = FakePredictor()

    async def run():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(predictor, executor, max_batch_size=64, max_queue_delay_s=2.0)

            async def late() -> object:
                with batcher.arriving():  # e.g. its body is still being read
                    await asyncio.sleep(0.05)
                return await batcher.infer({"x": np.full((2, 2), 2, np.int64)})

            both = await asyncio.gather(batcher.infer({"x": np.full((1, 2), 1, np.int64)}), late())

            # announced but never coming: the batch leaves once the delay is over
            batcher.max_queue_delay_s = 0.2
            with batcher.arriving():
                alone = await batcher.infer({"x": np.full((1, 2), 3, np.int64)})
            return both, alone

    (first, second), alone = asyncio.run(run())
    assert predictor.runs == [3, 1]  # the first request waited for the announced one: one run
    np.testing.assert_array_equal(second.outputs["y"], np.full((2, 2), 4))
    assert first.queue_s < 1.0  # it waited for the arrival, not for the whole delay
    assert 0.15 < alone.queue_s < 1.5
