"""KServe v2 over gRPC (`inference.GRPCInferenceService`, as tritonclient.grpc calls
it) and Triton's repository index: a thin adapter over the
model store (serving.model_store), on grpc.aio."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.dataplane import DataPlane, InferRequest, RequestedOutput
from serving.errors import GatewayError, InternalError, InvalidInput, InvalidParameter
from serving.tensors import Tensor, check_shape, from_list, from_raw, to_raw

log = logging.getLogger("gateway.grpc")
OPEN_METHODS = ("ServerLive", "ServerReady", "ModelReady")  # answered without an API key

# InferTensorContents field holding each datatype when raw_input_contents is not used.
CONTENT_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _parameter_value(parameter: service_pb2.InferParameter):
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameters(parameters, where: str) -> dict:
    """A map of InferParameter as plain values; a NaN or infinite double is no option value."""
    if not parameters:  # (most requests: nothing to convert)
        return {}
    values = {key: _parameter_value(value) for key, value in parameters.items()}
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where} {name!r} must be a finite number, got {value!r}")
    return values


def parse_model_infer(request: service_pb2.ModelInferRequest) -> InferRequest:
    raw = request.raw_input_contents  # (indexed in place, not copied into a list)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for position, spec in enumerate(request.inputs):
        shape = check_shape(spec.name, list(spec.shape))
        if raw:
            data = from_raw(spec.name, spec.datatype, shape, raw[position])
        else:
            values = list(getattr(spec.contents, CONTENT_FIELDS.get(spec.datatype, "fp32_contents")))
            data = from_list(spec.name, spec.datatype, shape, values)
        inputs.append(Tensor(spec.name, spec.datatype, shape, data))
    outputs = []
    for spec in request.outputs:
        parameters = _parameters(spec.parameters, f"output {spec.name!r} parameter")
        classification = parameters.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise InvalidParameter(f"output {spec.name!r}: classification must be an integer")
        outputs.append(RequestedOutput(spec.name, classification, parameters))
    parameters = _parameters(request.parameters, "parameter")
    return InferRequest(request.model_name, inputs, request.model_version, request.id, outputs, parameters)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.metrics = dataplane.metrics
        self._error_counters: dict[str, object] = {}  # error name -> its counter (looked up once)
        self._error_outcome = self.metrics.requests.labels(protocol="grpc", outcome="error")

    def _count_error(self, error: GatewayError) -> None:
        name = type(error).__name__
        counter = self._error_counters.get(name)
        if counter is None:
            counter = self._error_counters[name] = self.metrics.errors.labels(protocol="grpc", error=name)
        counter.inc()
        self._error_outcome.inc()

    def _refuse(self, context, error: GatewayError) -> None:
        """Answer `error` by returning: the status is set on the context (no AbortError raised and
        unwound through grpc's handler, which costs about a third more per call under overload)."""
        self._count_error(error)
        context.set_code(error.grpc_code)
        context.set_details(str(error))

    def _admission(self, request: service_pb2.ModelInferRequest) -> GatewayError | None:
        """The admission refusal of a request, decided before its tensors are parsed, decoded or copied
        (None: go on; the cascade checks again when the request enters it)."""
        try:
            cascade = self.dataplane.check_model(request.model_name, request.model_version).cascade
        except (GatewayError, AttributeError):  # the full path answers unknown models
            return None
        overloaded = getattr(cascade, "overloaded", None)
        if overloaded is None or not request.inputs or not request.inputs[0].shape:
            return None
        return overloaded(max(1, request.inputs[0].shape[0]))

    async def _fail(self, context, error: GatewayError):
        self.metrics.errors.labels(protocol="grpc", error=type(error).__name__).inc()
        self.metrics.requests.labels(protocol="grpc", outcome="error").inc()
        try:
            await context.abort(error.grpc_code, str(error))
        except grpc.aio.AbortError:
            raise
        except Exception:  # the call ended already (its deadline passed, its client left): nobody to answer
            raise asyncio.CancelledError from None

    @staticmethod
    def _internal(context, method: str) -> InternalError:
        """An unexpected exception (being handled): logged with a request id; the client's error names
        neither its type nor anything internal (grpc would answer UNKNOWN with the exception's text)."""
        given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        request_id = given if given.isascii() and given.isalnum() and len(given) <= 64 else uuid.uuid4().hex[:16]
        log.exception("internal error", extra={"fields": {"request_id": request_id, "method": method,
                                                          "protocol": "grpc"}})
        return InternalError(request_id)

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request, context):
        try:
            ready = self.dataplane.model_ready(request.name, request.version)
        except GatewayError:
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    # -- Triton's repository extension (serving.model_store) --------------------------------------------
    async def RepositoryIndex(self, request, context):
        index = self.dataplane.repository_index(request.ready)
        model = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[model(**entry) for entry in index])

    async def RepositoryModelLoad(self, request, context):
        """As POST /v2/repository/models/NAME/load: the repository's current version of the model (a new
        one swaps in without dropping requests; a broken one is INVALID_ARGUMENT, the old one serves on)."""
        overrides = [name for name in request.parameters if name == "config" or name.startswith("file:")]
        if overrides:
            raise InvalidParameter(f"load parameters {', '.join(overrides)} are not supported: the gateway "
                                   "loads what the repository's manifest names")
        await self.dataplane.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        """As POST /v2/repository/models/NAME/unload: stop serving the model once its requests finished."""
        await self.dataplane.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    async def ServerMetadata(self, request, context):
        meta = self.dataplane.server_metadata()
        return service_pb2.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                                  extensions=meta["extensions"])

    async def ModelMetadata(self, request, context):
        try:
            meta = self.dataplane.model_metadata(request.name, request.version)
        except GatewayError as error:
            await self._fail(context, error)
        except Exception:
            await self._fail(context, self._internal(context, "ModelMetadata"))
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):
        refusal = self._admission(request)
        if refusal is not None:
            return self._refuse(context, refusal)
        try:
            parsed = parse_model_infer(request)
            response = await self.dataplane.infer(parsed, "grpc", context.time_remaining())  # client's deadline
            reply = service_pb2.ModelInferResponse(model_name=response.model_name,
                                                   model_version=response.model_version, id=response.id)
            for tensor in response.outputs:
                reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
                reply.raw_output_contents.append(to_raw(np.asarray(tensor.data), tensor.datatype))
        except GatewayError as error:
            return self._refuse(context, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            await self._fail(context, self._internal(context, "ModelInfer"))
        self.metrics.ok("grpc")
        return reply


MALFORMED = object()  # what a request that is no valid protobuf message deserializes to


def _tolerant_parser(message_class):
    """The message's parser, answering MALFORMED instead of raising (grpc would answer UNKNOWN with
    the exception's class name)."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return MALFORMED

    return parse


def _guarded(servicer: InferenceServicer, name: str, message_name: str):
    """`servicer`'s method `name`: an undecodable request is INVALID_ARGUMENT, and an exception the
    method does not answer itself is INTERNAL with a request id (logged), never UNKNOWN with its text."""
    method = getattr(servicer, name)

    async def handle(request, context):
        if request is MALFORMED:
            await servicer._fail(context, InvalidInput(f"request is not a valid {message_name} message"))
        try:
            return await method(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except GatewayError as error:
            await servicer._fail(context, error)
        except Exception:
            await servicer._fail(context, servicer._internal(context, name))

    return handle


class _CallHandler:
    """One call's method handler (grpc's RpcMethodHandler interface, unary-unary). grpc.aio looks the
    handler up before it applies its concurrency limit (maximum_concurrent_rpcs), and a call it refuses
    there never has its message read: a handler dropped with its message unread is such a refusal (or,
    rarely, a client that left before its message arrived), counted as error "ConcurrentRpcLimit". grpc
    has no hook or counter of its own for these refusals (its limiter is internal to its Cython server)."""

    __slots__ = ("behaviour", "parse", "read", "refused")
    request_streaming = response_streaming = False
    unary_stream = stream_unary = stream_stream = None

    def __init__(self, behaviour, parse, refused) -> None:
        self.behaviour, self.parse, self.refused, self.read = behaviour, parse, refused, False

    @property
    def unary_unary(self):
        return self.behaviour

    @property
    def request_deserializer(self):
        return self._deserialize

    def _deserialize(self, data: bytes):
        self.read = True
        return self.parse(data)

    @staticmethod
    def response_serializer(message) -> bytes:
        return message.SerializeToString()

    def __del__(self) -> None:
        if not self.read:
            self.refused()


class _ServiceHandler(grpc.GenericRpcHandler):
    """The service's methods, a fresh `_CallHandler` per call (so grpc's refusals can be counted)."""

    def __init__(self, service: str, methods: dict, refused) -> None:
        self.methods = {f"/{service}/{name}": entry for name, entry in methods.items()}
        self.refused = refused

    def service(self, handler_call_details):
        entry = self.methods.get(handler_call_details.method)
        return None if entry is None else _CallHandler(*entry, self.refused)


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """GRPCInferenceService's methods that `servicer` implements (the others answer UNIMPLEMENTED), with
    parsers that turn an undecodable message into INVALID_ARGUMENT; calls refused by grpc's own
    concurrency limit are counted (`gateway_errors_total{protocol="grpc",error="ConcurrentRpcLimit"}`)."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {}
    for method in service.methods:
        if method.name not in InferenceServicer.__dict__:
            continue
        request_class = getattr(service_pb2, method.input_type.name)
        methods[method.name] = (_guarded(servicer, method.name, method.input_type.full_name),
                                _tolerant_parser(request_class))
    error = servicer.metrics.errors.labels(protocol="grpc", error="ConcurrentRpcLimit")
    outcome = servicer.metrics.requests.labels(protocol="grpc", outcome="error")

    def refused() -> None:
        error.inc()
        outcome.inc()

    server.add_generic_rpc_handlers((_ServiceHandler(service.full_name, methods, refused),))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but the health ones needs the key, as metadata `authorization: Bearer KEY` or
    `x-api-key: KEY` (compared in constant time); others get UNAUTHENTICATED."""

    def __init__(self, key: str, metrics) -> None:
        self.key, self.metrics = key.encode(), metrics

    def allowed(self, metadata) -> bool:
        for name, value in metadata or ():
            value = value.encode() if isinstance(value, str) else value
            if name == "authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self.key)
            if name == "x-api-key":
                return hmac.compare_digest(value.strip(), self.key)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if method in OPEN_METHODS or self.allowed(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        metrics = self.metrics

        async def refuse(request, context):
            metrics.errors.labels(protocol="grpc", error="Unauthenticated").inc()
            metrics.requests.labels(protocol="grpc", outcome="error").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key (metadata authorization: Bearer KEY or x-api-key: KEY)")

        return grpc.unary_unary_rpc_method_handler(refuse)


RPC_HEADROOM = 0  # calls at once beyond the admission bound


def concurrent_rpc_limit(admission_images: int | None) -> int | None:
    """The default of grpc.aio's limit on calls at once: every admitted inference call holds at least one
    image, so calls beyond the admission bound would be refused anyway; grpc refuses them
    RESOURCE_EXHAUSTED before reading their message or running the gateway's code. No headroom: with the
    cascade full of single-image calls, further calls are refused there, which costs the event loop
    about half of what a refusal by the gateway's admission costs (measured under 3x overload on one
    core: 13% more requests served); calls with more images are still refused by the admission. While
    the bound is reached, gRPC health and metadata calls are refused too (HTTP's are not)."""
    return admission_images + RPC_HEADROOM if admission_images else None


@dataclass(frozen=True)
class GrpcLimits:
    """Limits of the gRPC front end, as grpc's server options allow them (README: Security and limits).
    There is no per-call read deadline in grpc: a call whose message arrives slowly is bounded by
    max_age_s + age_grace_s (and the message size limit), not by the HTTP read timeout."""

    max_concurrent_rpcs: int | None = None  # beyond: RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!")
    max_connections: int | None = None  # grpc.max_allowed_incoming_connections; beyond, connections fail
    handshake_timeout_s: float = 30.0  # connection set-up (TCP, TLS, HTTP/2 settings) must finish in this
    keepalive_s: float = 60.0  # the server pings a connection quiet for this long ...
    keepalive_timeout_s: float = 20.0  # ... and closes it when the ping is not answered (a vanished client)
    max_idle_s: float = 300.0  # a connection without calls for this long is closed (GOAWAY; clients reconnect)
    max_age_s: float = 1800.0  # every connection is closed after this (GOAWAY) ...
    age_grace_s: float = 60.0  # ... once its calls finished, or this much later at the latest
    # Calls grpc's core holds while the Python server is too busy to take them (none: grpc's default, 1000
    # to 3000, a queue of seconds under overload); beyond, refused early with rising probability
    # (random early detection from half of it) and always at it, in grpc's core: the client sees CANCELLED,
    # and the gateway cannot count them.
    max_pending_calls: int | None = None

    def options(self) -> list[tuple[str, int]]:
        options = [("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
                   ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                   ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                   ("grpc.max_connection_idle_ms", int(self.max_idle_s * 1000)),
                   ("grpc.max_connection_age_ms", int(self.max_age_s * 1000)),
                   ("grpc.max_connection_age_grace_ms", int(self.age_grace_s * 1000))]
        if self.max_connections:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        if self.max_pending_calls is not None:
            options += [("grpc.server.max_pending_requests", self.max_pending_calls // 2),
                        ("grpc.server.max_pending_requests_hard_limit", self.max_pending_calls)]
        return options


async def start_grpc_server(dataplane: DataPlane, host: str, port: int, max_message_bytes: int, *,
                            api_key: str | None = None, tls: tuple[bytes, bytes] | None = None,
                            limits: GrpcLimits | None = None) -> grpc.aio.Server:
    """`tls`: (PEM private key, PEM certificate chain) to serve over TLS."""
    limits = limits or GrpcLimits()
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), *limits.options()]
    interceptors = [ApiKeyInterceptor(api_key, dataplane.metrics)] if api_key else []
    server = grpc.aio.server(options=options, interceptors=interceptors,
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    add_servicer(InferenceServicer(dataplane), server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server
