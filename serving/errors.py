"""The gateway's one error hierarchy, mapped once to HTTP status and gRPC codes."""

from __future__ import annotations

import functools
import math

import grpc

from serving.policy import PolicyError


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    headers: dict[str, str] = {}  # extra HTTP response headers (never mutated)


class InvalidInput(GatewayError):
    """Malformed request: bad JSON, bad binary header, wrong shape or dtype."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidParameter(GatewayError):
    """Well-formed request whose values make no sense (policy options, NaN tensors)."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(GatewayError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class PayloadTooLarge(GatewayError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InvalidImage(GatewayError):
    """An upload that is not a decodable image."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    """No API key, or the wrong one, on an endpoint that needs it."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class RequestTimeout(GatewayError):
    """The client took too long to send its request body."""

    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(GatewayError):
    """An unexpected exception: logged with its request id, answered without its details."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error (request id {request_id})")
        self.request_id = request_id


class Unavailable(GatewayError):
    """Shutting down, or the backend cannot be reached."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Overloaded(GatewayError):
    """Admission control: the cascade's queue is full; retry after `retry_after_s`
    (HTTP 429 with a Retry-After header, gRPC RESOURCE_EXHAUSTED)."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class DeadlineExceeded(GatewayError):
    """The request's deadline (gRPC deadline, `timeout`, or the server's default) passed
    before it was answered: it was taken out of every queue."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


def invalid_parameter_on_policy_error(function):
    """`function` of serving.policy (shared with the Triton cascade model, so serving-agnostic)
    with its PolicyError raised as InvalidParameter."""

    @functools.wraps(function)
    def mapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PolicyError as error:
            raise InvalidParameter(str(error)) from None

    return mapped
