"""The V2 REST server, over a real socket, with real clients (tritonclient.http, httpx)."""

from __future__ import annotations

import base64
import gzip
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from kiln import __version__
from kiln.serving.server import create_app, main

MODEL = "mnist"
SERVER_MAX_BODY = 256 * 1024  # conftest's server fixture limit


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    c = triton.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def infer_json(http: httpx.Client, body: object, path: str = f"/v2/models/{MODEL}/infer") -> httpx.Response:
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def pixels_request(pixels: np.ndarray, **extra: object) -> dict:
    return {
        "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}],
        **extra,
    }


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert fragment.lower() in body["error"].lower()


# --- tritonclient ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_matches_reference(client, models, make_digits, binary: bool) -> None:
    pixels = make_digits(16, seed=1)
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    result = client.infer(MODEL, [inp], outputs=outputs, request_id="req-42")

    probs, labels = models["1"].reference(pixels)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-4, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == MODEL and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["label", "probabilities"]
    for output in response["outputs"]:
        # binary outputs carry their size and no data; JSON outputs the reverse
        assert ("data" in output) is not binary
        assert ("binary_data_size" in output.get("parameters", {})) is binary


def test_tritonclient_without_requested_outputs_gets_all_as_binary(client, models, make_digits) -> None:
    pixels = make_digits(3, seed=2)
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    result = client.infer(MODEL, [inp])
    assert {o["name"] for o in result.get_response()["outputs"]} == {"label", "probabilities"}
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), models["1"].reference(pixels)[1])


def test_tritonclient_gzip_request(client, models, make_digits) -> None:
    pixels = make_digits(4, seed=3)
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    result = client.infer(MODEL, [inp], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("label"), models["1"].reference(pixels)[1])


def test_tritonclient_health_and_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1", "2", "3"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert client.get_server_metadata() == {"name": "kiln", "version": __version__, "extensions": ["binary_tensor_data"]}


def test_tritonclient_sees_errors(client) -> None:
    pixels = np.zeros((1, 28, 28), np.float32)
    inp = triton.InferInput("pixels", [1, 28, 28], "FP32").set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException, match="UINT8"):
        client.infer(MODEL, [inp])


# --- versions -------------------------------------------------------------------------------


def test_versions_are_addressable(client, models, make_digits) -> None:
    pixels = make_digits(32, seed=4)
    expected = {v: models[v].reference(pixels)[1] for v in ("1", "2")}
    assert not np.array_equal(expected["1"], expected["2"]), "the test needs versions that disagree"
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    for version in ("1", "2"):
        result = client.infer(MODEL, [inp], model_version=version)
        assert result.get_response()["model_version"] == version
        np.testing.assert_array_equal(result.as_numpy("label"), expected[version])
    # without a version: production, which is 1
    np.testing.assert_array_equal(client.infer(MODEL, [inp]).as_numpy("label"), expected["1"])


def test_version_metadata_and_readiness(http) -> None:
    meta = http.get(f"/v2/models/{MODEL}/versions/2").json()
    assert meta["name"] == MODEL and meta["inputs"][0]["name"] == "pixels"
    ready = http.get(f"/v2/models/{MODEL}/versions/2/ready")
    assert ready.status_code == 200 and ready.json() == {"name": MODEL, "version": "2", "ready": True}


def test_version_with_bad_checksum_is_unavailable(http, make_digits) -> None:
    assert_error(http.get(f"/v2/models/{MODEL}/versions/3/ready"), 503, "checksum mismatch")
    assert_error(infer_json(http, pixels_request(make_digits(1)), f"/v2/models/{MODEL}/versions/3/infer"), 503)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        f"/v2/models/{MODEL}/versions/9",
        f"/v2/models/{MODEL}/versions/9/ready",
        f"/v2/models/{MODEL}/versions/abc",
        f"/v2/models/{MODEL}/versions/01",
        f"/v2/models/{MODEL}/versions/-1",
        "/v2/nothing/here",
    ],
)
def test_unknown_models_versions_and_routes_are_404(http, path: str) -> None:
    assert_error(http.get(path), 404)


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", f"/v2/models/{MODEL}/versions/9/infer"])
def test_infer_on_unknown_model_or_version_is_404(http, make_digits, path: str) -> None:
    assert_error(infer_json(http, pixels_request(make_digits(1)), path), 404, "unknown")


# --- JSON requests with httpx -----------------------------------------------------------------


def test_health_and_server_metadata(http) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2").json() == {"name": "kiln", "version": __version__, "extensions": ["binary_tensor_data"]}


def test_json_nested_data_and_output_filter(http, models, make_digits) -> None:
    pixels = make_digits(2, seed=5)
    body = {
        "id": "nested",
        "inputs": [{"name": "pixels", "shape": [2, 28, 28], "datatype": "UINT8", "data": pixels.tolist()}],
        "outputs": [{"name": "label"}],
    }
    response = infer_json(http, body)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model_name": MODEL,
        "model_version": "1",
        "id": "nested",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [2], "data": models["1"].reference(pixels)[1].tolist()}
        ],
    }


def test_json_without_id_or_outputs_returns_every_output_as_json(http, make_digits) -> None:
    response = infer_json(http, pixels_request(make_digits(1)))
    assert response.status_code == 200
    body = response.json()
    assert "id" not in body
    assert [(o["name"], o["shape"]) for o in body["outputs"]] == [("probabilities", [1, 10]), ("label", [1])]
    assert sum(body["outputs"][0]["data"]) == pytest.approx(1.0, abs=1e-5)


def _pixels(**overrides: object) -> dict:
    spec = {"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784, **overrides}
    return {"inputs": [spec]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "inputs"),
        ({}, "inputs"),
        ([1, 2, 3], "invalid inference request"),
        ({"inputs": [{"name": "pixels"}]}, "shape"),
        (_pixels(shape=[1, 27, 28]), "shape"),
        (_pixels(shape=[1, 28, 28, 1], data=[0] * 784), "shape"),
        (_pixels(data=[0] * 783), "shape"),
        (_pixels(shape=[1, -28, 28]), "shape"),
        (_pixels(shape=[1, "28", 28]), "shape"),
        (_pixels(data=[[0] * 28] * 27 + [[0] * 27]), "regular array"),
        (_pixels(datatype="FP32"), "UINT8"),
        (_pixels(datatype="FLOAT"), "unknown datatype"),
        (_pixels(data=[256] + [0] * 783), "range"),
        (_pixels(data=[-1] + [0] * 783), "range"),
        (_pixels(data=[0.5] + [0] * 783), "integers"),
        (_pixels(data=["1"] + [0] * 783), "integers"),
        (_pixels(data=[True] * 784), "integers"),
        (_pixels(data=None), "neither data"),
        (_pixels(name="image_pixels"), "unknown input"),
        ({"inputs": _pixels()["inputs"] * 2}, "more than once"),
        ({**_pixels(), "outputs": [{"name": "logits"}]}, "unknown output"),
        ({**_pixels(), "outputs": [{"name": "label"}, {"name": "label"}]}, "more than once"),
        ({**_pixels(), "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}, "binary_data"),
        ({**_pixels(), "outputs": [{"name": "label", "parameters": {"classification": 3}}]}, "classification"),
        ({**_pixels(), "id": 7}, "id"),
    ],
)
def test_bad_requests_are_400(http, body: object, fragment: str) -> None:
    assert_error(infer_json(http, body), 400, fragment)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_are_400(http, literal: str) -> None:
    # Python's json and pydantic both accept these non-standard literals, so they arrive.
    content = '{"inputs":[{"name":"pixels","shape":[1,28,28],"datatype":"UINT8","data":[%s%s]}]}' % (
        literal,
        ",0" * 783,
    )
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=content), 400)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b'{"inputs": [}'])
def test_malformed_json_is_400(http, content: bytes) -> None:
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=content), 400, "invalid inference request")


def test_binary_data_errors_are_400(http) -> None:
    header = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}]}
    ).encode()
    url = f"/v2/models/{MODEL}/infer"

    def post(binary: bytes, header_length: object = len(header)) -> httpx.Response:
        return http.post(url, content=header + binary, headers={"Inference-Header-Content-Length": str(header_length)})

    assert post(bytes(784)).status_code == 200  # the well-formed baseline
    assert_error(post(bytes(700)), 400, "overruns")
    assert_error(post(bytes(784) + b"extra"), 400, "belong to no input")
    assert_error(post(bytes(784), header_length=len(header) + 10_000), 400, "does not fit")
    assert_error(post(bytes(784), header_length="many"), 400, "Inference-Header-Content-Length")
    short = header.replace(b"784}", b"700}")
    assert_error(
        http.post(url, content=short + bytes(700), headers={"Inference-Header-Content-Length": str(len(short))}),
        400,
        "700 bytes",
    )


def test_wrong_method_is_405_with_an_error_body(http) -> None:
    response = http.get(f"/v2/models/{MODEL}/infer")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"


# --- body limits ------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(http) -> None:
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=b" " * (SERVER_MAX_BODY + 1)), 413, "limit")


def test_chunked_body_over_the_limit_is_413(http) -> None:
    def chunks():
        for _ in range(5):
            yield b" " * (SERVER_MAX_BODY // 4)

    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=chunks()), 413, "limit")


def test_decompressed_body_over_the_limit_is_413(http) -> None:
    bomb = gzip.compress(b" " * (SERVER_MAX_BODY * 4))
    assert len(bomb) < SERVER_MAX_BODY
    response = http.post(f"/v2/models/{MODEL}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert_error(response, 413, "decompressed")


def test_body_at_the_limit_is_accepted(http, make_digits) -> None:
    body = json.dumps(pixels_request(make_digits(1))).encode()
    padded = body + b" " * (SERVER_MAX_BODY - len(body))  # trailing whitespace is valid JSON
    assert http.post(f"/v2/models/{MODEL}/infer", content=padded).status_code == 200


def test_unsupported_content_encoding_is_415(http, make_digits) -> None:
    body = json.dumps(pixels_request(make_digits(1))).encode()
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Encoding": "br"}), 415)


# --- PNG images -------------------------------------------------------------------------------


def test_png_image_input_json_and_binary(http, client, models, make_digits) -> None:
    pixels = make_digits(3, seed=6)
    pngs = [png(p) for p in pixels]
    expected = models["1"].reference(pixels)[1]

    body = {
        "inputs": [
            {"name": "image", "shape": [3], "datatype": "BYTES", "data": [base64.b64encode(p).decode() for p in pngs]}
        ],
        "outputs": [{"name": "label"}],
    }
    response = infer_json(http, body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == expected.tolist()

    inp = triton.InferInput("image", [3], "BYTES").set_data_from_numpy(np.array(pngs, dtype=object))
    result = client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("label")])
    np.testing.assert_array_equal(result.as_numpy("label"), expected)


def test_png_image_converts_colour_to_grayscale(http, models, make_digits) -> None:
    gray = make_digits(1, seed=7)[0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)  # equal channels: L conversion is exact
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png(rgb)).decode()]}]}
    response = infer_json(http, {**body, "outputs": [{"name": "label"}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == models["1"].reference(gray[None])[1].tolist()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([base64.b64encode(png(np.zeros((28, 27), np.uint8))).decode()], "is 27x28, expected 28x28"),
        (["not base64!"], "base64"),
        ([base64.b64encode(b"GIF89a not a png").decode()], "PNG"),
    ],
)
def test_bad_png_images_are_400(http, data: list[str], fragment: str) -> None:
    body = {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    assert_error(infer_json(http, body), 400, fragment)


def test_image_input_must_be_bytes_of_shape_n(http) -> None:
    encoded = base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode()
    assert_error(infer_json(http, {"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1]}]}), 400, "BYTES")
    body = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [[encoded]]}]}
    assert_error(infer_json(http, body), 400, "shape [N]")


# --- concurrency, metrics ---------------------------------------------------------------------


def test_concurrent_requests_get_their_own_answers(server, models, make_digits) -> None:
    batches = [make_digits(n, seed=100 + n) for n in range(1, 13)]

    def one(pixels: np.ndarray) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            response = infer_json(c, {**pixels_request(pixels), "outputs": [{"name": "label"}]})
        assert response.status_code == 200
        return response.json()["outputs"][0]["data"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, batches))
    assert answers == [models["1"].reference(b)[1].tolist() for b in batches]


def _request_count(http: httpx.Client, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name == "kiln_inference_requests":
            for sample in family.samples:
                if sample.name == "kiln_inference_requests_total" and sample.labels == labels:
                    return sample.value
    return 0.0


def test_metrics_count_requests_by_model_version_and_code(http, make_digits) -> None:
    ok = {"model": MODEL, "version": "2", "code": "200"}
    bad = {"model": MODEL, "version": "2", "code": "400"}
    before_ok, before_bad = _request_count(http, **ok), _request_count(http, **bad)
    url = f"/v2/models/{MODEL}/versions/2/infer"
    for _ in range(3):
        assert infer_json(http, pixels_request(make_digits(1)), url).status_code == 200
    assert infer_json(http, {"inputs": []}, url).status_code == 400
    assert _request_count(http, **ok) == before_ok + 3
    assert _request_count(http, **bad) == before_bad + 1

    text = http.get("/metrics").text
    assert 'kiln_inference_request_duration_seconds_count{model="mnist",version="2"}' in text
    # a made-up model name must not become a label value
    infer_json(http, pixels_request(make_digits(1)), "/v2/models/made-up/infer")
    assert "made-up" not in http.get("/metrics").text


# --- not ready, startup -----------------------------------------------------------------------


def test_without_production_alias_the_server_is_live_but_not_ready(unready_server, models, make_digits) -> None:
    with httpx.Client(base_url=unready_server.url, timeout=10) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert_error(http.get("/v2/health/ready"), 503, "no production version")
        assert_error(http.get(f"/v2/models/{MODEL}/ready"), 503)
        assert_error(http.get(f"/v2/models/{MODEL}"), 503)
        assert_error(infer_json(http, pixels_request(make_digits(1))), 503)
        # explicit versions are still served
        pixels = make_digits(2)
        response = infer_json(http, {**pixels_request(pixels), "outputs": [{"name": "label"}]}, f"/v2/models/{MODEL}/versions/2/infer")
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == models["2"].reference(pixels)[1].tolist()


def test_production_with_bad_checksum_stops_startup(make_store) -> None:
    root = make_store(production="3", corrupt=("3",))
    assert main(["--store", str(root), "--model", MODEL, "--port", "0"]) == 1


def test_production_with_bad_checksum_fails_the_app_lifespan(make_store, serve_app) -> None:
    root = make_store(production="3", corrupt=("3",))
    with pytest.raises(RuntimeError, match="did not start"):
        with serve_app(create_app(Path(root), MODEL, intra_op_threads=1)):
            pass
