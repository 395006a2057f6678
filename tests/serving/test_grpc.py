"""The KServe V2 gRPC endpoint: tritonclient.grpc and the generated stub against the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from kiln.serving.server import create_app, load_settings

MODEL = "mnist"
MAX_BODY = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grpc_server(store_root, serve_app):
    port = _free_port()
    app = create_app(store_root, MODEL, max_body_bytes=MAX_BODY, intra_op_threads=1, grpc_port=port)
    with serve_app(app) as running:
        yield SimpleNamespace(url=running.url, grpc_target=f"127.0.0.1:{port}", state=app.state.serving)


@pytest.fixture(scope="module")
def client(grpc_server):
    c = tgrpc.InferenceServerClient(grpc_server.grpc_target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(grpc_server):
    with grpc.insecure_channel(grpc_server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _pixels_input(pixels: np.ndarray) -> tgrpc.InferInput:
    inp = tgrpc.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    return inp


def _metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_tritonclient_round_trip_with_raw_contents(client, models, make_digits) -> None:
    pixels = make_digits(5, seed=11)
    for version, weights in (("", models["1"]), ("2", models["2"])):
        result = client.infer(MODEL, [_pixels_input(pixels)], model_version=version, request_id="r-7")
        want_probs, want_label = weights.reference(pixels)
        np.testing.assert_array_equal(result.as_numpy("label"), want_label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want_probs, rtol=1e-5, atol=1e-6)
        response = result.get_response()
        assert (response.model_version, response.id) == (version or "1", "r-7")
        assert len(response.raw_output_contents) == 2  # tritonclient reads raw outputs only
    only = client.infer(MODEL, [_pixels_input(pixels)], outputs=[tgrpc.InferRequestedOutput("label")])
    assert [o.name for o in only.get_response().outputs] == ["label"]


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "2")
    meta = client.get_server_metadata()
    assert meta.name == "kiln" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata(MODEL, "2")
    assert (model.name, list(model.versions), model.platform) == (MODEL, ["1", "2", "3"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("pixels", "UINT8", [-1, 28, 28])]
    assert [(t.name, t.datatype) for t in model.outputs] == [("probabilities", "FP32"), ("label", "INT64")]


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.get_model_metadata("nope"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.is_model_ready(MODEL, "9"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.is_model_ready(MODEL, "3"), grpc.StatusCode.UNAVAILABLE),  # checksum mismatch
    ],
)
def test_model_errors_are_status_codes(client, call, code) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == str(code)


def test_typed_contents_through_the_generated_stub(stub, models, make_digits) -> None:
    pixels = make_digits(3, seed=12)
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[3, 28, 28])
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    request = pb.ModelInferRequest(model_name=MODEL, model_version="2", id="typed", inputs=[tensor])
    response = stub.ModelInfer(request)
    want_probs, want_label = models["2"].reference(pixels)
    outputs = {o.name: o for o in response.outputs}
    assert not response.raw_output_contents  # typed in, typed out
    assert (outputs["label"].datatype, list(outputs["label"].shape)) == ("INT64", [3])
    assert list(outputs["label"].contents.int64_contents) == want_label.tolist()
    assert list(outputs["probabilities"].shape) == [3, 10]
    np.testing.assert_allclose(np.array(outputs["probabilities"].contents.fp32_contents).reshape(3, 10), want_probs,
                               rtol=1e-5, atol=1e-6)
    assert (response.model_name, response.model_version, response.id) == (MODEL, "2", "typed")
    # binary_data_output asks for raw outputs whatever the inputs were
    request.parameters["binary_data_output"].bool_param = True
    raw = stub.ModelInfer(request)
    assert np.frombuffer(raw.raw_output_contents[1], "<i8").tolist() == want_label.tolist()


def _typed_request(**change) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])
    tensor.contents.uint_contents.extend([7] * 784)
    for key, value in change.items():
        if key == "values":
            del tensor.contents.uint_contents[:]
            tensor.contents.uint_contents.extend(value)
        else:
            setattr(tensor, key, value)
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_typed_request(values=[300] * 784), "outside the UINT8 range"),
        (_typed_request(values=[1] * 10), "10 values in contents.uint_contents"),
        (_typed_request(datatype="FP32"), "0 values in contents.fp32_contents"),
        (_typed_request(name="x"), "unknown input 'x'"),
        (_typed_request(datatype="FP16"), "raw_input_contents only"),
        (pb.ModelInferRequest(model_name=MODEL), "no inputs"),
        (pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="UINT8", shape=[1, 28, 28])], raw_input_contents=[b"\0" * 783]),
         "783 raw bytes"),
        (pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="UINT8", shape=[1, 28, 28])], raw_input_contents=[b"\0" * 784, b""]),
         "2 raw_input_contents for 1 inputs"),
    ],
)
def test_bad_requests_are_invalid_argument(stub, request_, message) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details() and "\n" not in info.value.details()


def test_unknown_model_and_oversized_message(grpc_server, stub, client) -> None:
    before = _metric(grpc_server, "kiln_grpc_inference_requests_total", code="NOT_FOUND")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope", inputs=_typed_request().inputs))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _metric(grpc_server, "kiln_grpc_inference_requests_total", code="NOT_FOUND") == before + 1
    big = np.zeros((400, 28, 28), np.uint8)  # 313,600 bytes > the 256 KiB limit
    with pytest.raises(InferenceServerException) as too_big:
        client.infer(MODEL, [_pixels_input(big)])
    assert too_big.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_grpc_requests_share_the_rest_batcher_and_metrics(grpc_server, models, make_digits) -> None:
    ok = _metric(grpc_server, "kiln_grpc_inference_requests_total", code="OK")
    merged = _metric(grpc_server, "kiln_inference_batch_requests_sum", version="1")
    batches = [make_digits(1 + i % 3, seed=200 + i) for i in range(24)]
    body = lambda px: {"inputs": [{"name": "pixels", "shape": list(px.shape), "datatype": "UINT8",  # noqa: E731
                                   "data": px.ravel().tolist()}]}

    def call(i: int) -> np.ndarray:
        px = batches[i]
        if i % 2:
            with httpx.Client(base_url=grpc_server.url) as http:
                out = http.post(f"/v2/models/{MODEL}/infer", json=body(px)).json()["outputs"]
            return np.array(next(o for o in out if o["name"] == "label")["data"])
        with tgrpc.InferenceServerClient(grpc_server.grpc_target) as c:
            return c.infer(MODEL, [_pixels_input(px)]).as_numpy("label")

    with ThreadPoolExecutor(12) as pool:
        labels = list(pool.map(call, range(len(batches))))
    for px, got in zip(batches, labels, strict=True):
        np.testing.assert_array_equal(got, models["1"].reference(px)[1])
    assert _metric(grpc_server, "kiln_grpc_inference_requests_total", code="OK") == ok + 12
    # every request, REST or gRPC, went through the version's one batcher
    assert _metric(grpc_server, "kiln_inference_batch_requests_sum", version="1") == merged + 24


# --- fuzz: whatever a client sends, never INTERNAL ---------------------------------------------

DATATYPES = ["BOOL", "UINT8", "UINT16", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "uint8", ""]
FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
          "fp64_contents", "bytes_contents"]
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
dims = st.integers(min_value=-2, max_value=40) | st.sampled_from([28, 784, 2**31, 2**62])
field_values = {
    "bool_contents": st.lists(st.booleans(), max_size=30),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=800),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=30),
    "fp32_contents": st.lists(st.floats(width=32), max_size=30),
    "fp64_contents": st.lists(st.floats(), max_size=30),
    "bytes_contents": st.lists(st.binary(max_size=12), max_size=4),
}
tensors = st.fixed_dictionaries({
    "name": st.sampled_from(["pixels", "image", "label", "x", ""]),
    "datatype": st.sampled_from(DATATYPES),
    "shape": st.lists(dims, max_size=4),
    "contents": st.sampled_from(FIELDS).flatmap(lambda f: field_values[f].map(lambda v: {f: v})) | st.none(),
    "parameters": st.sampled_from([{}, {"shared_memory_region": "r"}, {"binary_data_size": 3}]),
})
fuzz_requests = st.fixed_dictionaries({
    "model_name": st.sampled_from([MODEL, "", "nope"]),
    "model_version": st.sampled_from(["", "1", "2", "9", "x"]),
    "inputs": st.lists(tensors, max_size=3),
    "raw": st.none() | st.lists(st.binary(max_size=900) | st.just(b"\x07" * 784), max_size=3),
    "outputs": st.lists(st.sampled_from(["label", "probabilities", "nope", ""]), max_size=3),
    "binary_out": st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1),
})


def _build(spec: dict) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=spec["model_name"], model_version=spec["model_version"])
    for t in spec["inputs"]:
        tensor = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for key, value in t["parameters"].items():
            if isinstance(value, str):
                tensor.parameters[key].string_param = value
            else:
                tensor.parameters[key].int64_param = value
        for field, values in (t["contents"] or {}).items():
            getattr(tensor.contents, field).extend(values)
    for blob in spec["raw"] or []:
        request.raw_input_contents.append(blob)
    for name in spec["outputs"]:
        request.outputs.add(name=name)
    flag = spec["binary_out"]
    if isinstance(flag, bool):
        request.parameters["binary_data_output"].bool_param = flag
    elif flag is not None:
        request.parameters["binary_data_output"].int64_param = flag
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(spec=fuzz_requests)
def test_fuzzed_requests_never_yield_internal(stub, spec) -> None:
    try:
        stub.ModelInfer(_build(spec), timeout=30)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_CODES, (e.code(), e.details())
        assert e.details() and "\n" not in e.details()


# --- configuration and drain of the real process -----------------------------------------------


def test_grpc_port_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_GRPC_PORT", raising=False)
    assert load_settings([]).grpc_port == 8081
    assert load_settings(["--grpc-port", "9001"]).grpc_port == 9001
    assert load_settings(["--grpc-port", "0"]).grpc_port == 0  # off
    monkeypatch.setenv("KILN_GRPC_PORT", "9002")
    assert load_settings([]).grpc_port == 9002
    with pytest.raises(SystemExit):
        load_settings(["--grpc-port", "70000"])


def test_a_taken_grpc_port_fails_startup(store_root, serve_app) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = create_app(store_root, MODEL, intra_op_threads=1, grpc_port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="did not start"):
            with serve_app(app):
                pass


@pytest.mark.load
def test_sigterm_drains_grpc_and_fails_no_accepted_call(make_store, models, make_digits) -> None:
    root = make_store(production="1")
    port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    drain_s = 1.5
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.serving.server", "--store", str(root), "--model", MODEL, "--port", str(port),
         "--grpc-port", str(grpc_port), "--drain-delay-s", str(drain_s), "--poll-interval-s", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{grpc_port}"
    pixels = [make_digits(1 + i % 3, seed=60 + i) for i in range(8)]
    expected = [models["1"].reference(p)[1].tolist() for p in pixels]
    events: list[tuple[float, str, bool]] = []  # (seconds after SIGTERM, status code name, right answer)
    signalled: list[float] = []

    def since() -> float:
        return time.monotonic() - signalled[0] if signalled else -1.0

    async def caller(i: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = i
            while True:
                k = n % len(pixels)
                n += 1
                request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
                    name="pixels", datatype="UINT8", shape=pixels[k].shape)], raw_input_contents=[pixels[k].tobytes()])
                try:
                    response = await stub.ModelInfer(request, timeout=20)
                except grpc.aio.AioRpcError as e:
                    events.append((since(), e.code().name, False))
                    return
                label = np.frombuffer(response.raw_output_contents[1], "<i8").tolist()
                events.append((since(), "OK", label == expected[k]))

    async def terminate() -> list[bool]:
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        signalled.append(time.monotonic())
        await asyncio.sleep(0.3)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = await stub.ServerReady(pb.ServerReadyRequest())
            live = await stub.ServerLive(pb.ServerLiveRequest())
        return [ready.ready, live.live]

    async def run() -> list[bool]:
        *_, probes = await asyncio.gather(*(caller(i) for i in range(8)), terminate())
        return probes

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with tgrpc.InferenceServerClient(target) as c:
                    if c.is_server_ready():
                        break
            except InferenceServerException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        probes = asyncio.run(run())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "serving KServe V2 gRPC" in output and "draining" in output
    assert probes == [False, True]  # not ready while draining, still live
    answered = [e for e in events if e[1] == "OK"]
    failed = [e for e in events if e[1] != "OK"]
    assert answered and all(right for *_, right in answered)
    assert sum(1 for t, *_ in answered if 0 < t < drain_s) > 8  # served on while not ready
    # Calls fail only once the server stops: refused (UNAVAILABLE), or, racing the close,
    # dropped before any handler took them (CANCELLED); clients retry either.
    assert all(t >= drain_s and code in ("UNAVAILABLE", "CANCELLED") for t, code, _ in failed), failed
