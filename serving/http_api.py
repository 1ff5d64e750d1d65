"""KServe v2 over HTTP (JSON and the binary-tensor extension), `/v1/classify` and
`/metrics`: a thin adapter over the dataplane."""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from serving.dataplane import DataPlane, InferRequest, InferResponse, RequestedOutput, options_from_parameters
from serving.errors import GatewayError, InvalidImage, InvalidInput, InvalidParameter, PayloadTooLarge
from serving.preprocess import decode_image
from serving.tensors import Tensor, check_shape, from_list, from_raw, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo tritonclient's request compression (gzip or deflate), within the size limit."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decoder.decompress(body, limit + 1)
    except zlib.error as error:
        raise InvalidInput(f"body is not valid {encoding} data: {error}") from None
    if len(data) > limit or decoder.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return data


def _loads(text: bytes):
    """orjson (fast); what it refuses (NaN and Infinity literals, integers over 64 bits) goes to the
    standard library's json, so the accepted documents and the error messages stay json's."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"request is not valid JSON: {error}") from None


def _dumps(document: dict, finite: bool) -> bytes:
    """orjson (fast) unless a value is NaN or infinite, which orjson writes as null and json as NaN/Infinity."""
    return orjson.dumps(document) if finite else json.dumps(document).encode()


def parse_infer_request(model_name: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[: int(header_length)], body[int(header_length):]
    else:
        json_part, binary = body, b""
    document = _loads(json_part)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput("request must be a JSON object with an 'inputs' list")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    inputs, offset = [], 0
    for spec in document["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput("every input needs a name, shape and datatype")
        name, datatype = spec["name"], spec.get("datatype")
        shape = check_shape(name, spec.get("shape"))
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} exceeds the binary data")
            data = from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in spec:
            data = from_list(name, datatype, shape, spec["data"])
        else:
            raise InvalidInput(f"input {name!r} has neither data nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = []
    for spec in document.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput("every requested output needs a name")
        out_params = spec.get("parameters") or {}
        classification = out_params.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise InvalidParameter("classification must be an integer")
        outputs.append(RequestedOutput(spec["name"], classification, out_params))
    return InferRequest(model_name, inputs, version, str(document.get("id", "")), outputs, parameters)


def render_infer_response(response: InferResponse, binary_default: bool) -> Response:
    outputs, blobs, finite = [], [], True
    for tensor, requested in zip(response.outputs, response.requested):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if requested.parameters.get("binary_data", binary_default):
            blob = to_raw(tensor.data, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode() for item in tensor.data.reshape(-1)]
        else:
            entry["data"] = tensor.data.reshape(-1).tolist()
            finite = finite and (tensor.datatype != "FP32" or bool(np.isfinite(tensor.data).all()))
        outputs.append(entry)
    header = _dumps({"model_name": response.model_name, "model_version": response.model_version,
                     "id": response.id, "outputs": outputs}, finite)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def create_http_app(dataplane: DataPlane, max_body_bytes: int, lifespan=None) -> FastAPI:
    app = FastAPI(title="Early-exit gateway", version="0.1.0", lifespan=lifespan,
                  description="KServe v2 inference with per-sample early exits")
    metrics = dataplane.metrics

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError):
        protocol = "classify" if request.url.path.startswith("/v1/") else "http"
        metrics.errors.labels(protocol=protocol, error=type(error).__name__).inc()
        metrics.requests.labels(protocol=protocol, outcome="error").inc()
        return JSONResponse({"error": str(error)}, status_code=error.http_status)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200 if dataplane.live() else 503)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if dataplane.ready() else 503)

    @app.get("/v2")
    async def server_metadata():
        return dataplane.server_metadata()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = ""):
        return dataplane.model_metadata(name, version)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = ""):
        dataplane.check_model(name, version)
        return Response(status_code=200 if dataplane.ready() else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = ""):
        body = decompress(await read_body(request, max_body_bytes), request.headers.get("content-encoding"),
                          max_body_bytes)
        parsed = parse_infer_request(name, version, body, request.headers.get(HEADER_LENGTH))
        response = await dataplane.infer(parsed, "http")
        metrics.ok("http")
        return render_infer_response(response, bool(parsed.parameters.get("binary_data_output", False)))

    @app.post("/v1/classify")
    async def classify(request: Request, policy: str | None = None, threshold: str | None = None,
                       budget_ms: float | None = None, exit_depth: int | None = None, top_k: int = 3):
        """Classify uploaded images (multipart field `files`, PNG/JPEG, any size).

        Each image is converted to RGB, centre-cropped to a square, resized to the
        model's input size (bilinear) and normalised with the manifest's mean/std.
        """
        started = time.perf_counter()
        # Enforce the size limit while reading, then let starlette parse the cached body.
        request._body = await read_body(request, max_body_bytes)
        try:
            form = await request.form()
        except Exception as error:  # starlette raises several types for bad multipart
            raise InvalidInput(f"expected a multipart/form-data upload: {error}") from None
        uploads = [item for _, item in form.multi_items() if hasattr(item, "read")]
        if not uploads:
            raise InvalidInput("no image files in the upload (use multipart field 'files')")
        if not 1 <= top_k <= 100:
            raise InvalidParameter("top_k must be between 1 and 100")
        size = tuple(dataplane.manifest.input.shape[1:])
        images = []
        for upload in uploads:
            content = await upload.read()
            try:
                images.append(decode_image(content, size))
            except InvalidImage as error:
                raise InvalidImage(f"{upload.filename or 'upload'}: {error}") from None
        parameters = {k: v for k, v in {"policy": policy, "threshold": threshold, "budget_ms": budget_ms,
                                        "exit_depth": exit_depth}.items() if v is not None}
        options = options_from_parameters(parameters, dataplane.default_policy)
        answers = await dataplane.classify(np.stack(images), options, top_k)
        for upload, answer in zip(uploads, answers):
            answer["filename"] = upload.filename
        metrics.ok("classify")
        return {"model": dataplane.manifest.model, "results": answers,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
