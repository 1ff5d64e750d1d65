"""The HTTP front end's ASGI middleware and request lifetime: generic 500s for exceptions that escape a
handler (`InternalErrors`), the API key (`ApiKey`), request ids, and cancelling a request's work when
its client disconnects (`cancel_on_disconnect`, `ClientGone`)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid

import orjson
from fastapi import Request

from serving.metrics import GatewayMetrics

OPEN_PATHS = ("/v2/health/", "/docs", "/redoc", "/openapi.json")  # answered without an API key
MODEL_READY = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("gateway.http")


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


def protocol_of(path: str) -> str:
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
            protocol = protocol_of(scope["path"])
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
        protocol = protocol_of(scope["path"])
        self.metrics.errors.labels(protocol=protocol, error="Unauthenticated").inc()
        self.metrics.requests.labels(protocol=protocol, outcome="error").inc()
        body = orjson.dumps({"error": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)"})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

