"""The floor of a Python gRPC front end: a grpc.aio KServe v2 servicer that answers
ModelInfer with a fixed three-output response and runs no model and no gateway code.

    .venv/bin/python benchmarks/profiles/bare_servicer.py --port 8091 &
    .venv/bin/python benchmarks/profiles/gateway_load.py --pid $! --url 127.0.0.1:8091 --policy full

With --delay-ms the answer waits (asyncio.sleep), so the floor can be measured at the
gateway's request rate: a front end's CPU per request grows as the rate falls
(fewer requests share each event-loop wake-up).

Its CPU per request, measured beside the gateway's under the same load, is what
the gateway's overhead per request is compared with (uvloop when installed, as the
gateway).
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc


class BareServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def ModelInfer(self, request, context):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name, datatype, shape, array in (("logits", "FP32", [1, 10], np.zeros(10, np.float32)),
                                             ("exit_depth", "INT32", [1], np.zeros(1, np.int32)),
                                             ("confidence", "FP32", [1], np.zeros(1, np.float32))):
            reply.outputs.add(name=name, datatype=datatype, shape=shape)
            reply.raw_output_contents.append(array.tobytes())
        return reply


async def serve(port: int, delay_s: float) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(delay_s), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="wait this long before answering (compare at the gateway's request rate: c / rate)")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.run(serve(args.port, args.delay_ms / 1000))
    except ImportError:
        asyncio.run(serve(args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
