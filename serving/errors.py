"""The gateway's one error hierarchy, mapped once to HTTP status and gRPC codes."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


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


class Unavailable(GatewayError):
    """Shutting down, or the backend cannot be reached."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
