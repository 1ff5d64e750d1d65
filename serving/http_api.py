"""KServe v2 over HTTP (JSON and the binary-tensor extension), `/v1/classify` and
`/metrics`: a thin adapter over the dataplane.

Every malformed request is a 4xx naming what is wrong (a `GatewayError`); anything
else that escapes a handler is logged with a request id and answered with a generic
500 that names nothing internal, on a connection that stays open (`InternalErrors`).

The request bodies (parsing, validation, rendering, uploads) live in serving.http_bodies, the
middleware and disconnect handling in serving.http_middleware; their names are importable from here too.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError

from serving.dataplane import options_from_parameters
from serving.errors import GatewayError, InvalidInput, InvalidParameter
from serving.http_bodies import (
    HEADER_LENGTH,
    HttpOptions,
    ImageDecoder,
    decompress,
    json_object,
    json_response,
    parse_infer_request,
    parse_json,
    read_body,
    read_uploads,
    refuse_load_overrides,
    render_infer_response,
)
from serving.http_middleware import (
    MODEL_READY,
    OPEN_PATHS,
    REQUEST_ID,
    ApiKey,
    ClientGone,
    InternalErrors,
    cancel_on_disconnect,
    protocol_of,
    request_id_of,
    until_disconnect,
)
from serving.model_store import ModelStore
from serving.openapi import CLASSIFY_BODY, INFER_BODY

__all__ = ["HEADER_LENGTH", "MODEL_READY", "OPEN_PATHS", "REQUEST_ID", "ApiKey", "ClientGone", "HttpOptions",
           "ImageDecoder", "InternalErrors", "cancel_on_disconnect", "create_http_app", "decompress",
           "json_response", "parse_infer_request", "read_body", "render_infer_response", "request_id_of",
           "until_disconnect"]


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
        protocol = protocol_of(request.url.path)
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
        document = json_object(parse_json(await read_body(request, 64 << 10) or b"{}"), "body")
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
        refuse_load_overrides(json_object(parse_json(await read_body(request, 64 << 10) or b"{}"), "body"))
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

        Each image is converted to RGB, centre-cropped to the model's aspect ratio, resized to the
        model's input size (bilinear) and normalised with the manifest's mean/std.
        `model`: which of the gateway's models answers (default: the repository's first).
        """
        started = time.perf_counter()
        if not 1 <= top_k <= 100:
            raise InvalidParameter("top_k must be between 1 and 100")
        chosen = dataplane.resolve(model)
        uploads, contents = await read_uploads(request, max_body_bytes, dataplane.max_request_batch)
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
