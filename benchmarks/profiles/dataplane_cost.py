"""The gateway's own CPU per request without the network: ModelInfer called in-process.

    PYTHONPATH=. .venv/bin/python benchmarks/profiles/dataplane_cost.py --requests 20000

The real gRPC servicer, dataplane and cascade of the code on PYTHONPATH, over an
instant backend (it returns logits whose confidence varies by sample and stage, so
early exit takes several exits), are called by `--concurrency` coroutines with the
protobuf request tritonclient sends (one 32x32x3 UINT8 image, or `--per-request` of
them, the policy's parameters). Process CPU per request, under uvloop when installed, is printed per
policy. What it leaves out, gRPC's transport (the bare grpc.aio servicer's 0.30 ms),
and the model are the same before and after a change, so this isolates the part
the gateway's code decides and compares two versions of it on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2

from common.manifest import read_manifest
from serving.cascade import Cascade, CascadeSettings
from serving.dataplane import DataPlane
from serving.grpc_api import InferenceServicer
from serving.metrics import GatewayMetrics
from serving.policy import exit_plan

POLICIES = {"full": {"policy": "full"}, "fixed15": {"policy": "fixed", "exit_depth": 15}, "early": {}}


class InstantBackend:
    name = "instant"
    has_exit_models = True

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def _logits(self, stage: int, inputs: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(inputs), self.classes), np.float32)
        logits[:, 0] = (stage + 1) * 2.5 * np.abs(inputs.reshape(len(inputs), -1)[:, 0])
        return logits

    def run(self, stage: int, inputs: np.ndarray):
        return self._logits(stage, inputs), inputs

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        return self._logits(index, images)

    def close(self) -> None:
        pass


class CallContext:
    """What the servicer asks of grpc's context on a successful call: no client deadline, no metadata."""

    @staticmethod
    def time_remaining():
        return None

    @staticmethod
    def invocation_metadata():
        return ()

    def set_code(self, code) -> None:
        raise RuntimeError(f"the call failed: {code}")

    set_details = set_code


def model_infer_request(model: str, image: np.ndarray, parameters: dict) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="r")
    request.inputs.add(name="images", datatype="UINT8", shape=list(image.shape))
    request.raw_input_contents.append(image.tobytes())
    for key, value in parameters.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request


async def measure(repository: Path, policy: str, requests: int, concurrency: int, per_request: int = 1) -> dict:
    manifest = read_manifest(repository)
    metrics = GatewayMetrics()
    cascade = Cascade(InstantBackend(len(manifest.classes)), exit_plan(manifest), CascadeSettings(), metrics)
    await cascade.start()
    servicer = InferenceServicer(DataPlane(manifest, cascade, metrics))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, per_request, 32, 32, 3), dtype=np.uint8)
    protos = [model_infer_request(manifest.model, image, POLICIES[policy]) for image in images]
    exits: dict[int, int] = {}

    async def client(offset: int, count: int) -> None:
        for k in range(count):
            reply = await servicer.ModelInfer(protos[(offset + k) % len(protos)], CallContext())
            for depth in np.frombuffer(reply.raw_output_contents[1], np.int32).tolist():
                exits[depth] = exits.get(depth, 0) + 1

    await asyncio.gather(*(client(k, 50) for k in range(concurrency)))  # warm-up
    exits.clear()
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(k, requests // concurrency) for k in range(concurrency)))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - started
    done = requests // concurrency * concurrency
    await cascade.stop()
    return {"policy": policy, "requests": done, "cpu_ms_per_request": round(cpu * 1000 / done, 4),
            "wall_ms_per_request": round(elapsed * 1000 / done, 4), "exits": dict(sorted(exits.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--policy", choices=sorted(POLICIES), action="append")
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    for policy in args.policy or list(POLICIES):
        print(json.dumps(run(measure(args.repository, policy, args.requests, args.concurrency, args.per_request))),
              flush=True)


if __name__ == "__main__":
    main()
