"""The floor of a Python gRPC front end: a grpc.aio KServe v2 servicer that answers
ModelInfer with a fixed three-output response and runs no model and no gateway code.

    .venv/bin/python benchmarks/profiles/bare_servicer.py --port 8091 &
    .venv/bin/python benchmarks/profiles/gateway_load.py --pid $! --url 127.0.0.1:8091 --policy full

With --delay-ms the answer waits (asyncio.sleep), so the floor can be measured at the
gateway's request rate: a front end's CPU per request grows as the rate falls
(fewer requests share each event-loop wake-up). With --max-concurrent-rpcs grpc refuses
the calls beyond (RESOURCE_EXHAUSTED), as the gateway's limit does: with a limit of 1 and
a delay, nearly every call of an open-loop load is refused, and the server's CPU per call
is the floor of a refusal (benchmarks/profiles/refusal_floor.py).

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
    def __init__(self, delay_s: float = 0.0, refuse: bool = False) -> None:
        self.delay_s, self.refuse = delay_s, refuse

    async def ModelInfer(self, request, context):
        if self.refuse and request.id == "refuse":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name, datatype, shape, array in (("logits", "FP32", [1, 10], np.zeros(10, np.float32)),
                                             ("exit_depth", "INT32", [1], np.zeros(1, np.int32)),
                                             ("confidence", "FP32", [1], np.zeros(1, np.float32))):
            reply.outputs.add(name=name, datatype=datatype, shape=shape)
            reply.raw_output_contents.append(array.tobytes())
        return reply


async def serve(port: int, delay_s: float, max_concurrent_rpcs: int | None = None, refuse: bool = False) -> None:
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(delay_s, refuse), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="wait this long before answering (compare at the gateway's request rate: c / rate)")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=None,
                        help="grpc's own limit: calls beyond it are refused RESOURCE_EXHAUSTED (default: none)")
    parser.add_argument("--refuse", action="store_true",
                        help="abort every call whose request id is 'refuse' RESOURCE_EXHAUSTED in the handler "
                             "(after grpc read and parsed it; others are answered, so that a load generator can "
                             "warm up)")
    args = parser.parse_args()
    main_task = serve(args.port, args.delay_ms / 1000, args.max_concurrent_rpcs, args.refuse)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_task)
    else:
        uvloop.run(main_task)


if __name__ == "__main__":
    main()
