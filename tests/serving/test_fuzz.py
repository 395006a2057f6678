"""Hypothesis fuzz of the infer endpoint: whatever the client sends, never a 5xx."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "mnist"
# (version 3 of the fixture store is corrupt: its 503 is by design, so it is left out)
PATHS = [f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/2/infer"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "uint8", "", "STRING"]

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
dims = st.integers(min_value=-2, max_value=40) | st.sampled_from([28, 784, 2**31, 2**63, 2**70]) | json_scalars
shapes = st.lists(dims, max_size=4) | json_values
numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.booleans()
data = (
    st.lists(numbers, max_size=30)
    | st.lists(st.lists(numbers, max_size=5), max_size=5)
    | st.lists(st.text(max_size=12), max_size=4)
    | json_values
)
parameters = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "classification", "shared_memory_region", "binary_data_output", "x"]),
    json_scalars,
    max_size=3,
)
request_input = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["pixels", "image", "label", "x"]) | json_scalars,
        "shape": shapes,
        "datatype": st.sampled_from(DATATYPES) | json_scalars,
    },
    optional={"data": data, "parameters": parameters | json_values},
)
request_output = st.fixed_dictionaries(
    {"name": st.sampled_from(["label", "probabilities", "nope"]) | json_scalars},
    optional={"parameters": parameters},
)
v2_requests = st.fixed_dictionaries(
    {"inputs": st.lists(request_input, max_size=3) | json_values},
    optional={"id": json_scalars, "outputs": st.lists(request_output, max_size=3) | json_values, "parameters": parameters},
)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def assert_not_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


@SETTINGS
@given(body=v2_requests, path=st.sampled_from(PATHS))
def test_v2_shaped_bodies_never_yield_5xx(http, body, path) -> None:
    assert_not_5xx(http.post(path, content=json.dumps(body)))


@SETTINGS
@given(body=json_values)
def test_arbitrary_json_bodies_never_yield_5xx(http, body) -> None:
    assert_not_5xx(http.post(PATHS[0], content=json.dumps(body)))


@SETTINGS
@given(
    header=v2_requests,
    binary=st.binary(max_size=64),
    header_length=st.none()
    | st.just("exact")
    | st.integers(min_value=-5, max_value=4096).map(str)
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),
    encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity"]),
    compress=st.booleans(),
)
def test_binary_and_encoded_bodies_never_yield_5xx(http, header, binary, header_length, encoding, compress) -> None:
    head = json.dumps(header).encode()
    if header_length == "exact":
        header_length = str(len(head))
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    content = head + binary
    if compress and encoding == "gzip":
        content = gzip.compress(content)
    elif compress and encoding == "deflate":
        content = zlib.compress(content)
    assert_not_5xx(http.post(PATHS[0], content=content, headers=headers))
