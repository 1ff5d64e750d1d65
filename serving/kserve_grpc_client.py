"""A lean KServe v2 ModelInfer client for the gateway's forwarding (`--backend triton-cascade`
over gRPC; issue 19).

tritonclient.grpc.aio builds every request from InferInput and InferRequestedOutput
objects and a parameters dictionary, and wraps every response in an InferResult
that looks each output up by name. The forwarding sends the same request shape again
and again: here the part that depends only on the request's options (model name,
requested outputs, parameters) is serialized once per options, and each call
serializes only its input tensor and appends it (protobuf messages concatenate: the
result is one ModelInferRequest). Outputs are read straight from
`raw_output_contents`. Errors are tritonclient's `InferenceServerException`, as
tritonclient raises them (status `StatusCode.<code>`, the server's message), so that
callers map them as before.
"""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
DTYPES = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "UINT8": np.uint8,
          "FP64": np.float64, "INT8": np.int8, "BOOL": np.bool_}


def constant_part(model: str, outputs, parameters: dict) -> bytes:
    """The serialized ModelInferRequest fields that stay the same for every call with `parameters`."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name in outputs:
        request.outputs.add().name = name
    for name, value in parameters.items():
        set_parameter(request.parameters[name], value)
    return request.SerializeToString()


def set_parameter(parameter, value) -> None:
    """Set a KServe v2 gRPC `InferParameter` from a Python value (bool, int, float, else string), as
    tritonclient does."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


class KServeGrpcClient:
    """ModelInfer calls on one grpc.aio channel (`channel_args`: grpc channel options)."""

    def __init__(self, url: str, channel_args=None) -> None:
        self.channel = grpc.aio.insecure_channel(url, options=channel_args)
        self._infer = self.channel.unary_unary(MODEL_INFER, request_serializer=None,
                                               response_deserializer=service_pb2.ModelInferResponse.FromString)

    async def infer(self, constant: bytes, name: str, datatype: str, inputs: np.ndarray,
                    timeout_s: float | None) -> dict[str, np.ndarray]:
        """`inputs` as input `name` of `datatype` (raw, little-endian) in a request whose other fields are
        `constant` (see constant_part): each output by name."""
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=inputs.shape)
        variable = service_pb2.ModelInferRequest(inputs=[tensor], raw_input_contents=[inputs.tobytes()])
        try:
            response = await self._infer(constant + variable.SerializeToString(), timeout=timeout_s)
        except grpc.RpcError as error:
            raise InferenceServerException(msg=error.details(), status=str(error.code()),
                                           debug_details=error.debug_error_string()) from None
        outputs = {}
        for position, output in enumerate(response.outputs):
            dtype = DTYPES.get(output.datatype)
            if dtype is None or position >= len(response.raw_output_contents):
                raise InferenceServerException(msg=f"output {output.name!r}: unexpected {output.datatype} answer",
                                               status="StatusCode.INTERNAL")
            outputs[output.name] = np.frombuffer(response.raw_output_contents[position],
                                                 dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(output.shape))
        return outputs

    async def close(self) -> None:
        await self.channel.close()
