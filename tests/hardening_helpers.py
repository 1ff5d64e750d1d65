"""What the hardening tests of the front ends share (test_hardening_api*.py): the gateway most of
them call, with small limits, and valid KServe v2 request documents to break."""

from __future__ import annotations

import json

import httpx

from .conftest import GatewayProcess

MODEL = "mwresnet8_3"
BATCH_LIMIT = 128


def hardened_gateway(tiny_repository, tmp_path_factory):
    """A module-scoped fixture's body (`yield from` it): a gateway with small body, batch, pixel and file
    limits, its log at `log_file`."""
    log = tmp_path_factory.mktemp("hardening") / "gateway.log"
    process = GatewayProcess(tiny_repository, "--max-body-mb", "2", "--max-request-batch", str(BATCH_LIMIT),
                             "--max-image-pixels", "1000000", "--max-request-pixels", "2000000",
                             "--max-image-mb", "0.5", log_path=log)
    process.log_file = log
    yield process
    assert process.stop() == 0


def post(gateway, body: bytes, headers=None, path=f"/v2/models/{MODEL}/infer"):
    return httpx.post(f"http://{gateway.http_url}{path}", content=body,
                      headers=headers or {"Content-Type": "application/json"}, timeout=30)


def valid_request(**changes) -> dict:
    request = {"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                           "data": [0.0] * 3072}]}
    request.update(changes)
    return request


def input_spec(**changes) -> dict:
    spec = {"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
    spec.update(changes)
    return spec


def json_body(document) -> bytes:
    return json.dumps(document).encode()


def strict_json(text: bytes):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)
