"""The gateway's one error hierarchy, mapped once to HTTP status and gRPC codes."""

from __future__ import annotations

import functools

import grpc

from serving.policy import PolicyError


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
