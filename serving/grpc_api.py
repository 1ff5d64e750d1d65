"""KServe v2 over gRPC (`inference.GRPCInferenceService`, as tritonclient.grpc calls
it): a thin adapter over the dataplane, on grpc.aio."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.dataplane import DataPlane, InferRequest, RequestedOutput
from serving.errors import GatewayError, InvalidInput, InvalidParameter
from serving.tensors import Tensor, check_shape, from_list, from_raw, to_raw

# InferTensorContents field holding each datatype when raw_input_contents is not used.
CONTENT_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _parameter_value(parameter: service_pb2.InferParameter):
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def parse_model_infer(request: service_pb2.ModelInferRequest) -> InferRequest:
    raw = list(request.raw_input_contents)
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
        parameters = {key: _parameter_value(value) for key, value in spec.parameters.items()}
        classification = parameters.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise InvalidParameter("classification must be an integer")
        outputs.append(RequestedOutput(spec.name, classification, parameters))
    parameters = {key: _parameter_value(value) for key, value in request.parameters.items()}
    return InferRequest(request.model_name, inputs, request.model_version, request.id, outputs, parameters)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.metrics = dataplane.metrics

    async def _fail(self, context, error: GatewayError):
        self.metrics.errors.labels(protocol="grpc", error=type(error).__name__).inc()
        self.metrics.requests.labels(protocol="grpc", outcome="error").inc()
        await context.abort(error.grpc_code, str(error))

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request, context):
        try:
            self.dataplane.check_model(request.name, request.version)
        except GatewayError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.dataplane.ready())

    async def ServerMetadata(self, request, context):
        meta = self.dataplane.server_metadata()
        return service_pb2.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                                  extensions=meta["extensions"])

    async def ModelMetadata(self, request, context):
        try:
            meta = self.dataplane.model_metadata(request.name, request.version)
        except GatewayError as error:
            await self._fail(context, error)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):
        try:
            parsed = parse_model_infer(request)
            response = await self.dataplane.infer(parsed, "grpc")
        except GatewayError as error:
            await self._fail(context, error)
        self.metrics.ok("grpc")
        reply = service_pb2.ModelInferResponse(model_name=response.model_name,
                                               model_version=response.model_version, id=response.id)
        for tensor in response.outputs:
            reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            reply.raw_output_contents.append(to_raw(np.asarray(tensor.data), tensor.datatype))
        return reply


async def start_grpc_server(dataplane: DataPlane, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server
