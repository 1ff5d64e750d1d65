"""The front ends under hostile input (issue 25), bounded fuzzing: hypothesis bodies for the JSON and
binary paths and malformed gRPC messages, schemathesis on the OpenAPI document, and benchmarks.fuzz's
mutation fuzzer (the robustness run's) against a real gateway process on the tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .hardening_helpers import MODEL, hardened_gateway, json_body, post, strict_json, valid_request


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    yield from hardened_gateway(tiny_repository, tmp_path_factory)


# -- fuzzing: hypothesis bodies for the JSON and binary paths, malformed gRPC ------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)), max_leaves=12)
FIELD_NAMES = ["name", "shape", "datatype", "data", "parameters", "id", "outputs", "inputs", "binary_data_size",
               "classification", "binary_data", "policy", "threshold", "budget_ms", "exit_depth", "score"]
DATATYPE_VALUES = st.sampled_from(["FP32", "UINT8", "BYTES", "FP64", "INT64", "BOOL", "FP16", "", "fp32"])
SHAPES = st.one_of(st.lists(st.integers(min_value=-2, max_value=2 ** 65), max_size=5),
                   st.sampled_from([[1, 3, 32, 32], [1, 32, 32, 3], [2, 3, 32, 32], [0, 3, 32, 32]]), JSON_VALUES)


@st.composite
def infer_documents(draw):
    """Inference requests near the valid one, with any field replaced by any JSON value."""
    shape = draw(SHAPES)
    spec = {"name": draw(st.sampled_from(["images", "x", ""])), "shape": shape, "datatype": draw(DATATYPE_VALUES)}
    if draw(st.booleans()):
        count = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 4096
                                                                      for d in shape) else 3
        spec["data"] = draw(st.lists(st.one_of(st.floats(width=32), st.integers(-300, 300)),
                                     min_size=min(count, 3072), max_size=min(count, 3072)))
    else:
        spec["data"] = draw(JSON_VALUES)
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3)):
        spec[name] = draw(JSON_VALUES)
    document = {"inputs": [spec] if draw(st.booleans()) else draw(JSON_VALUES)}
    for name in draw(st.lists(st.sampled_from(["parameters", "outputs", "id"]), max_size=3)):
        document[name] = draw(st.one_of(
            JSON_VALUES, st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4),
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "exit_depth", "nope"]),
                                            "parameters": JSON_VALUES}), max_size=2)))
    return document


FUZZ_SETTINGS = settings(max_examples=250, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])


def _no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.headers.get("content-type", "").startswith("application/json"):
        strict_json(response.content)


@FUZZ_SETTINGS
@given(document=infer_documents(), non_finite=st.booleans())
def test_fuzzed_json_infer_bodies_never_get_5xx(gateway, document, non_finite):
    body = json.dumps(document, allow_nan=True).encode()
    if non_finite:
        body = body.replace(b"0.0", b"NaN", 1).replace(b"1.0", b"Infinity", 1)
    with httpx.Client(timeout=30) as client:
        _no_5xx(client.post(f"http://{gateway.http_url}/v2/models/{MODEL}/infer", content=body))


@FUZZ_SETTINGS
@given(document=infer_documents(), header=st.one_of(st.integers(-5, 5000).map(str), st.text(max_size=4)),
       binary=st.binary(max_size=13000), encoding=st.sampled_from([None, "gzip", "deflate", "br"]))
def test_fuzzed_binary_infer_bodies_never_get_5xx(gateway, document, header, binary, encoding):
    prefix = json.dumps(document).encode()
    headers = {"Inference-Header-Content-Length": header if header.isascii() and header.isprintable()
               else str(len(prefix))}
    if encoding:
        headers["Content-Encoding"] = encoding
    with httpx.Client(timeout=30) as client:
        _no_5xx(client.post(f"http://{gateway.http_url}/v2/models/{MODEL}/infer", content=prefix + binary,
                            headers=headers))


PARAMETER_VALUES = st.one_of(st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1), st.floats(), st.text(max_size=8))


@st.composite
def grpc_requests(draw):
    request = service_pb2.ModelInferRequest(model_name=draw(st.sampled_from([MODEL, "nope", ""])),
                                            model_version=draw(st.sampled_from(["", "1", "2"])), id=draw(st.text()))
    for _ in range(draw(st.integers(0, 2))):
        spec = request.inputs.add(name=draw(st.sampled_from(["images", "x"])), datatype=draw(DATATYPE_VALUES),
                                  shape=draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=5)))
        if draw(st.booleans()):
            spec.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=40)))
            spec.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2 ** 32 - 1), max_size=40)))
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=13000), max_size=2)))
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3)):
        value = draw(PARAMETER_VALUES)
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    for name in draw(st.lists(st.sampled_from(["logits", "exit_depth", "nope"]), max_size=2)):
        output = request.outputs.add(name=name)
        output.parameters["classification"].int64_param = draw(st.integers(-3, 5))
    return request


@pytest.fixture(scope="module")
def grpc_stub(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel), channel


@FUZZ_SETTINGS
@given(request=grpc_requests())
def test_fuzzed_grpc_requests_never_get_unknown_or_internal(grpc_stub, request):
    stub, _ = grpc_stub
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error.details()
        assert "Error" not in error.details() and "Exception" not in error.details(), error.details()


# -- schemathesis on the OpenAPI document ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi_schema(gateway):
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(f"http://{gateway.http_url}/openapi.json", timeout=30)
    schema.base_url = f"http://{gateway.http_url}"
    return schema


def test_schemathesis_finds_no_5xx(openapi_schema):
    """Every operation of the OpenAPI document, requests generated from its schemas (bodies included);
    the model's path parameter is the served model most of the time, so the infer and classify bodies
    are reached, not only 404s."""
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {"/v2/models/{name}/infer", "/v1/classify"} <= {operation.path for operation in operations}
    statuses = []
    for operation in operations:
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), served=st.integers(0, 3))
        def call(case, served):
            if "name" in (case.path_parameters or {}) and served:
                case.path_parameters["name"] = MODEL
            response = case.call(base_url=openapi_schema.base_url, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        call()
    assert 200 in statuses and any(400 <= status < 500 for status in statuses)


def test_a_504_for_the_clients_own_expired_timeout_is_not_a_fuzz_finding(gateway):
    """The fuzz run's one expected 5xx: a request whose own `timeout` (1 microsecond) passed is answered
    504 DeadlineExceeded (gRPC: DEADLINE_EXCEEDED), which the fuzzer does not count as a finding."""
    from benchmarks.fuzz import own_timeout_expired

    body = json.dumps({**valid_request(), "parameters": {"timeout": 1}}).encode()
    answer = post(gateway, body)
    assert answer.status_code == 504 and "deadline" in answer.json()["error"]
    assert own_timeout_expired(504, answer.content, body, {"Content-Type": "application/json"})
    assert not own_timeout_expired(504, answer.content, json_body(valid_request()), {})  # no deadline of its own
    assert not own_timeout_expired(500, answer.content, body, {})


def test_mutation_fuzzer_finds_nothing(gateway, tiny_repository):
    """benchmarks.fuzz (the robustness run's 50,000-request fuzzer), bounded: every kind of mutated
    request (JSON, binary, raw bodies, uploads, gRPC messages and undecodable gRPC bytes) is answered,
    none with a 5xx, UNKNOWN or INTERNAL, none dropped or hanging."""
    from benchmarks.fuzz import KINDS, fuzz
    from common.manifest import read_manifest

    shape = tuple(read_manifest(tiny_repository).input.shape)
    result = asyncio.run(fuzz(gateway.http_url, gateway.grpc_url, MODEL, shape, requests=600, concurrency=4,
                              seed=1))
    assert result["requests"] == 600 and result["bad"] == 0, result["findings"]
    assert {key.split(":")[0] for key in result["answers"]} == set(KINDS)
    assert any(key.endswith(":200") or key.endswith(":OK") for key in result["answers"])
