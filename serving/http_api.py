"""KServe v2 over HTTP (JSON and the binary-tensor extension), `/v1/classify` and
`/metrics`: a thin adapter over the dataplane.

Every malformed request is a 4xx naming what is wrong (a `GatewayError`); anything
else that escapes a handler is logged with a request id and answered with a generic
500 that names nothing internal, on a connection that stays open (`InternalErrors`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect

from serving.dataplane import InferRequest, InferResponse, RequestedOutput, options_from_parameters
from serving.errors import (
    GatewayError,
    InvalidImage,
    InvalidInput,
    InvalidParameter,
    PayloadTooLarge,
    RequestTimeout,
)
from serving.metrics import GatewayMetrics
from serving.model_store import ModelStore
from serving.openapi import CLASSIFY_BODY, INFER_BODY
from serving.preprocess import MAX_PIXELS, declared_pixels, decode_image
from serving.tensors import Tensor, check_shape, from_list, from_raw, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"
OPEN_PATHS = ("/v2/health/", "/docs", "/redoc", "/openapi.json")  # answered without an API key
MODEL_READY = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("gateway.http")


@dataclass(frozen=True)
class HttpOptions:
    """Limits and security of the HTTP front end (serving.settings has them all, with their defaults)."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = MAX_PIXELS
    max_request_pixels: int = 4 * MAX_PIXELS
    decode_threads: int = 2
    api_key: str | None = None
    docs: bool = True


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect:  # the client left, or was too slow (serving.http_server's read timeout)
        raise RequestTimeout("the client disconnected before sending the whole request") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The HTTP client disconnected while its request was being computed."""


async def until_disconnect(request: Request) -> None:
    """Returns when the client disconnects. Only after its body was read whole: uvicorn answers a
    `receive` then only when the connection is lost (or the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work):
    """Await the coroutine `work`, cancelling it when the client disconnects first, as grpc.aio cancels a
    call whose client left: the cascade then drops the request's samples before the next backend call
    (reason "cancelled"). Raises ClientGone then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone
    return task.result()


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo tritonclient's request compression (gzip or deflate), within the size limit."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding[:40]!r}; use gzip or deflate")
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
    except RecursionError:
        raise InvalidInput("request is not valid JSON: nested too deeply") from None


def _object(value, where: str) -> dict:
    """`value` if it is a JSON object, {} if absent (null); anything else is the client's error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{where}' must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value, where: str) -> dict:
    """A `parameters` object whose numbers are finite (NaN or Infinity are no JSON, and no option)."""
    parameters = _object(value, where)
    for name, item in parameters.items():
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"'{where}.{name}' must be a finite number, got {item!r}")
    return parameters


def _header_length(value: str, body_size: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > body_size:
        raise InvalidInput(f"{HEADER_LENGTH} {value[:40]!r} is not a length within the body of {body_size} bytes")
    return int(value)


def parse_infer_request(model_name: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        split = _header_length(header_length, len(body))
        json_part, binary = body[:split], body[split:]
    else:
        json_part, binary = body, b""
    document = _loads(json_part)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput("request must be a JSON object with an 'inputs' list")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(document.get("parameters"), "parameters")
    inputs, offset = [], 0
    for position, spec in enumerate(document["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"inputs[{position}] must be an object with a 'name' string")
        name, datatype = spec["name"], spec.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
        shape = check_shape(name, spec.get("shape"))
        size = _parameters(spec.get("parameters"), f"inputs[{position}].parameters").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
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
    requested = document.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise InvalidInput(f"'outputs' must be a list, got {type(requested).__name__}")
    outputs = []
    for position, spec in enumerate(requested or []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"outputs[{position}] must be an object with a 'name' string")
        out_params = _parameters(spec.get("parameters"), f"outputs[{position}].parameters")
        classification = out_params.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise InvalidParameter(f"outputs[{position}].parameters.classification must be an integer")
        outputs.append(RequestedOutput(spec["name"], classification, out_params))
    return InferRequest(model_name, inputs, version, request_id, outputs, parameters)


def render_infer_response(response: InferResponse, binary_default: bool) -> Response:
    """The response document; NaN and infinite values in JSON data are written as null, as KServe's own
    server writes them (orjson) and as numpy reads them back into float arrays (NaN); binary outputs keep
    them exactly."""
    outputs, blobs = [], []
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
        outputs.append(entry)
    header = orjson.dumps({"model_name": response.model_name, "model_version": response.model_version,
                           "id": response.id, "outputs": outputs})
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def json_response(document, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(document), status_code=status_code, media_type="application/json",
                    headers=headers)


def _protocol(path: str) -> str:
    return "classify" if path.startswith("/v1/") else "http"


def request_id_of(headers) -> str:
    """The client's X-Request-ID when it is a short token, else a new one."""
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


class InternalErrors:
    """ASGI middleware: an exception that escapes a handler is logged with a request id, counted
    (error "InternalError"), and answered with a generic 500 that keeps the connection open (an
    exception reaching uvicorn would close it, and its message could name internal things)."""

    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
            request_id = request_id_of(headers)
            protocol = _protocol(scope["path"])
            log.exception("internal error", extra={"fields": {"request_id": request_id, "path": scope["path"],
                                                              "protocol": protocol}})
            self.metrics.errors.labels(protocol=protocol, error="InternalError").inc()
            self.metrics.requests.labels(protocol=protocol, outcome="error").inc()
            if started:  # part of a response went out: nothing better than closing is possible
                raise
            body = orjson.dumps({"error": f"internal error (request id {request_id})"})
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})


class ApiKey:
    """ASGI middleware: every HTTP request but health and docs needs the key, as `Authorization: Bearer
    KEY` or `X-API-Key: KEY` (compared in constant time); others get 401."""

    def __init__(self, app, key: str, metrics: GatewayMetrics) -> None:
        self.app, self.key, self.metrics = app, key.encode(), metrics

    def allowed(self, scope) -> bool:
        path = scope["path"]
        if path.startswith(OPEN_PATHS) or MODEL_READY.match(path):
            return True
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self.key)
            if name == b"x-api-key":
                return hmac.compare_digest(value.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        protocol = _protocol(scope["path"])
        self.metrics.errors.labels(protocol=protocol, error="Unauthenticated").inc()
        self.metrics.requests.labels(protocol=protocol, outcome="error").inc()
        body = orjson.dumps({"error": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)"})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class ImageDecoder:
    """Uploads to uint8 images of the model's size, within the limits, decoded in a worker pool so the
    event loop keeps answering (health, other requests) while large images decode."""

    def __init__(self, input_shape: tuple[int, int, int], options: HttpOptions) -> None:
        self.channels, self.size, self.options = input_shape[0], tuple(input_shape[1:]), options
        self.pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="decode")

    def check(self, uploads: list, contents: list[bytes]) -> None:
        """Refuse before decoding anything: file sizes, and the pixels each header declares (a few
        microseconds a header), per image and per request."""
        total = 0
        for upload, content in zip(uploads, contents):
            name = upload.filename or "upload"
            if len(content) > self.options.max_image_bytes:
                raise PayloadTooLarge(f"{name}: file of {len(content)} bytes exceeds the limit of "
                                      f"{self.options.max_image_bytes}")
            try:
                width, height = declared_pixels(content)
            except InvalidImage as error:
                raise InvalidImage(f"{name}: {error}") from None
            if width * height > self.options.max_image_pixels:
                raise PayloadTooLarge(f"{name}: image of {width}x{height} pixels exceeds the limit of "
                                      f"{self.options.max_image_pixels} pixels per image")
            total += width * height
        if total > self.options.max_request_pixels:
            raise PayloadTooLarge(f"{total} pixels in one upload exceed the limit of "
                                  f"{self.options.max_request_pixels}")

    async def decode(self, uploads: list, contents: list[bytes],
                     input_shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """`input_shape` (C, H, W): the model's, when not the one the decoder was made for."""
        self.check(uploads, contents)
        channels, size = (input_shape[0], tuple(input_shape[1:])) if input_shape else (self.channels, self.size)
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, decode_image, content, size, self.options.max_image_pixels,
                                     channels) for content in contents]
        images = []
        try:
            for upload, job in zip(uploads, jobs):
                try:
                    images.append(await job)
                except InvalidImage as error:
                    raise InvalidImage(f"{upload.filename or 'upload'}: {error}") from None
        finally:
            for job in jobs:
                job.cancel()  # the ones not started yet: no work for a refused request
        return np.stack(images)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _refuse_load_overrides(document: dict) -> None:
    """A load request's parameters (Triton: a config or files to load instead) are not supported here."""
    parameters = _object(document.get("parameters"), "parameters")
    overrides = [name for name in parameters if name == "config" or name.startswith("file:")]
    if overrides:
        raise InvalidParameter(f"load parameters {', '.join(overrides)} are not supported: the gateway loads "
                               "what the repository's manifest names")


def create_http_app(dataplane: ModelStore, options: HttpOptions | int, lifespan=None) -> FastAPI:
    if isinstance(options, int):  # the earlier signature: the body limit alone
        options = HttpOptions(max_body_bytes=options)
    docs = {} if options.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Early-exit gateway", version="0.1.0", lifespan=lifespan,
                  description="KServe v2 inference with per-sample early exits", **docs)
    metrics = dataplane.metrics
    max_body_bytes = options.max_body_bytes
    decoder = app.state.image_decoder = ImageDecoder(tuple(dataplane.manifest.input.shape), options)
    classify_latency = metrics.request_latency.labels("classify")
    app.add_middleware(InternalErrors, metrics=metrics)
    if options.api_key:
        app.add_middleware(ApiKey, key=options.api_key, metrics=metrics)  # outermost: refused before any work

    def count_error(request: Request, error_name: str) -> None:
        protocol = _protocol(request.url.path)
        metrics.errors.labels(protocol=protocol, error=error_name).inc()
        metrics.requests.labels(protocol=protocol, outcome="error").inc()

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError):
        count_error(request, type(error).__name__)
        return json_response({"error": str(error)}, error.http_status, getattr(error, "headers", None) or None)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        """Nobody reads this answer (nginx's 499 in the access log): counted, not logged as an error."""
        count_error(request, "ClientDisconnected")
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, error: RequestValidationError):
        count_error(request, "InvalidParameter")
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
        return json_response({"error": problems}, InvalidParameter.http_status)

    @app.get("/v2/health/live")
    async def live():
        ok = dataplane.live()
        return json_response({"live": ok}, 200 if ok else 503)

    @app.get("/v2/health/ready")
    async def ready():
        ok = dataplane.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    @app.get("/v2")
    async def server_metadata():
        return json_response(dataplane.server_metadata())

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = ""):
        return json_response(dataplane.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = ""):
        ok = dataplane.model_ready(name, version)
        return json_response({"name": name, "ready": ok}, 200 if ok else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        """Triton's repository extension: every model of the repository, its version and state."""
        document = _object(_loads(await read_body(request, 64 << 10) or b"{}"), "body")
        ready_only = document.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput("'ready' must be true or false")
        return json_response(dataplane.repository_index(ready_only))

    # Loading and unloading change what the gateway serves: administration, left out of the OpenAPI
    # document (so generated API clients and schema fuzzers do not call them); the README documents them.
    @app.post("/v2/repository/models/{name}/load", include_in_schema=False)
    async def repository_load(name: str, request: Request):
        """Load the repository's current version of `name` (a new one swaps in without dropping requests;
        a broken one is refused, 400, and the version serving keeps serving)."""
        _refuse_load_overrides(_object(_loads(await read_body(request, 64 << 10) or b"{}"), "body"))
        loaded = await dataplane.load(name)
        return json_response({"name": name, "version": str(loaded.version)})

    @app.post("/v2/repository/models/{name}/unload", include_in_schema=False)
    async def repository_unload(name: str, request: Request):
        """Stop serving `name` once its in-flight requests have finished (a load serves it again)."""
        await read_body(request, 64 << 10)
        await dataplane.unload(name)
        return json_response({"name": name})

    @app.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
    async def infer(name: str, request: Request, version: str = ""):
        """KServe v2 inference: a JSON document, or JSON followed by binary tensors (the length of the
        JSON in the Inference-Header-Content-Length header)."""
        body = decompress(await read_body(request, max_body_bytes), request.headers.get("content-encoding"),
                          max_body_bytes)
        parsed = parse_infer_request(name, version, body, request.headers.get(HEADER_LENGTH))
        response = await cancel_on_disconnect(  # the client's deadline (seconds), and its disconnect
            request, dataplane.infer(parsed, "http", request.headers.get("timeout")))
        metrics.ok("http")
        return render_infer_response(response, bool(parsed.parameters.get("binary_data_output", False)))

    @app.post("/v1/classify", openapi_extra=CLASSIFY_BODY)
    async def classify(request: Request, policy: str | None = None, threshold: str | None = None,
                       budget_ms: float | None = None, exit_depth: int | None = None, top_k: int = 3,
                       model: str | None = None):
        """Classify uploaded images (multipart field `files`, PNG/JPEG/WebP/GIF/BMP, within the limits).

        Each image is converted to RGB, centre-cropped to a square, resized to the
        model's input size (bilinear) and normalised with the manifest's mean/std.
        `model`: which of the gateway's models answers (default: the repository's first).
        """
        started = time.perf_counter()
        if not 1 <= top_k <= 100:
            raise InvalidParameter("top_k must be between 1 and 100")
        chosen = dataplane.resolve(model)
        # Enforce the size limit while reading, then let starlette parse the cached body.
        request._body = await read_body(request, max_body_bytes)
        try:
            form = await request.form(max_files=dataplane.max_request_batch, max_fields=16,
                                      max_part_size=64 << 10)
        except Exception as error:  # starlette raises several types for bad multipart
            message = str(getattr(error, "detail", "") or "malformed multipart body")
            if "Too many files" in message:
                raise PayloadTooLarge(f"more than {dataplane.max_request_batch} files in one upload") from None
            raise InvalidInput(f"expected a multipart/form-data upload: {message}") from None
        uploads = [item for _, item in form.multi_items() if hasattr(item, "read")]
        if not uploads:
            raise InvalidInput("no image files in the upload (use multipart field 'files')")
        contents = [await upload.read() for upload in uploads]
        images = await decoder.decode(uploads, contents, tuple(chosen.manifest.input.shape))
        parameters = {k: v for k, v in {"policy": policy, "threshold": threshold, "budget_ms": budget_ms,
                                        "exit_depth": exit_depth}.items() if v is not None}
        options_ = options_from_parameters(parameters, dataplane.default_policy)
        answers = await cancel_on_disconnect(request, dataplane.classify(images, options_, top_k, model=chosen.name))
        for upload, answer in zip(uploads, answers):
            answer["filename"] = upload.filename
        metrics.ok("classify")
        elapsed = time.perf_counter() - started
        classify_latency.observe(elapsed)
        return json_response({"model": chosen.name, "results": answers,
                              "latency_ms": round(elapsed * 1000, 3)})

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
