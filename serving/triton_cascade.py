"""`--backend triton-cascade`: the whole cascade runs inside Triton, in the `<model>_cascade`
model the exporter writes (common/triton_cascade.py); the gateway sends each request
there in one call and keeps `/v1/classify`, the KServe front ends, validation and
metrics.

It stands in for `serving.cascade.Cascade` (same `start`, `stop`, `infer`, `plan`,
`accepting`): the dataplane has already validated and resolved the request's options,
so they travel explicitly (every threshold included) and Triton decides with the
same policy code (serving/policy.py, copied beside the model). The images travel
normalised (`normalised_images`, FP32 NCHW) because the dataplane has normalised them.
Triton's dynamic batcher batches requests; the model re-batches the samples that
continue at every stage. `budget_ms` is passed on as it is: inside Triton it counts
from when the cascade model starts executing the request's batch.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from common.manifest import Manifest
from common.triton_cascade import NORMALISED_INPUT, cascade_model_name
from serving.backends import triton_request
from serving.cascade import CascadeResult
from serving.errors import InvalidParameter, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import ExitPlan, RequestOptions

OUTPUTS = ("logits", "exit_depth", "confidence")


def request_parameters(options: RequestOptions) -> dict:
    """KServe parameters for resolved `options` (numbers as exact decimal strings: every
    client and Triton version passes strings; the policy parser reads them back)."""
    parameters = {"policy": options.policy, "score": options.score,
                  "threshold": ",".join(repr(float(t)) for t in options.thresholds)}
    if options.budget_ms is not None:
        parameters["budget_ms"] = repr(float(options.budget_ms))
    if options.exit_depth is not None:
        parameters["exit_depth"] = int(options.exit_depth)
    return parameters


class TritonCascade:
    name = "triton-cascade"

    def __init__(self, manifest: Manifest, plan: ExitPlan, url: str, protocol: str = "grpc",
                 metrics: GatewayMetrics | None = None, timeout_s: float = 30.0) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
        self.plan, self.metrics, self.url, self.protocol, self.timeout_s = plan, metrics, url, protocol, timeout_s
        self.model = cascade_model_name(manifest.model)
        self.max_batch_size = manifest.max_batch_size
        self.depths = np.asarray(plan.depths)
        self.accepting = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._client = None
        if protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self.module = module
        self._check_ready()

    def _check_ready(self) -> None:
        """Fail at start-up, with one line, when Triton or the cascade model is not there."""
        if self.protocol == "grpc":
            import tritonclient.grpc as blocking
        else:
            import tritonclient.http as blocking
        client = blocking.InferenceServerClient(self.url)
        try:
            ready = client.is_model_ready(self.model)
        except Exception as error:  # tritonclient raises its own exception types
            raise Unavailable(f"Triton at {self.url} is not reachable: {error}") from None
        finally:
            client.close()
        if not ready:
            raise Unavailable(f"Triton at {self.url} has no ready model {self.model} "
                              f"(export the repository again: the exporter writes it)")

    @property
    def queue_depth(self) -> int:
        return self.in_flight

    async def start(self, warmup_input: np.ndarray | None = None) -> None:
        self._client = self.module.InferenceServerClient(self.url)
        self._idle = asyncio.Event()
        self._idle.set()
        if warmup_input is not None:
            await self._call(warmup_input, {"policy": "full"})
        self.accepting = True

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), close the client."""
        self.accepting = False
        if self._idle is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._client is not None:
            await self._client.close()

    async def infer(self, inputs: np.ndarray, options: RequestOptions) -> CascadeResult:
        """Normalised images through `<model>_cascade` with the request's (resolved) options."""
        if not self.accepting:
            raise Unavailable("the gateway is shutting down")
        self.in_flight += 1
        self._idle.clear()
        parameters, size = request_parameters(options), self.max_batch_size
        try:  # the model's max_batch_size bounds a call: larger requests go in concurrent parts
            parts = await asyncio.gather(*(self._call(inputs[start:start + size], parameters)
                                           for start in range(0, len(inputs), size)))
            logits, depths, confidence = (np.concatenate(outputs) for outputs in zip(*parts))
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        exit_index = np.searchsorted(self.depths, depths).astype(np.int32)
        if self.metrics:
            for index, count in zip(*np.unique(exit_index, return_counts=True)):
                self.metrics.exits.labels(depth=str(self.plan.depths[index])).inc(int(count))
        return CascadeResult(logits, exit_index, confidence)

    async def _call(self, inputs: np.ndarray, parameters: dict) -> tuple[np.ndarray, ...]:
        tensor, requested, timeout = triton_request(self.module, self.protocol, NORMALISED_INPUT, inputs, OUTPUTS,
                                                    self.timeout_s)
        try:
            result = await self._client.infer(self.model, [tensor], outputs=requested, parameters=parameters,
                                              **timeout)
        except Exception as error:  # tritonclient's InferenceServerException and transport errors
            raise _gateway_error(self.model, error) from None
        return tuple(result.as_numpy(name) for name in OUTPUTS)


def _gateway_error(model: str, error: Exception):
    """Triton's answer as the gateway's error: its 400s stay the client's fault, the rest is 503."""
    status = str(getattr(error, "status", lambda: "")() or "")
    message = getattr(error, "message", lambda: str(error))() or str(error)
    if "INVALID_ARG" in status or status == "400":  # the dataplane validated first: rare
        return InvalidParameter(f"{model}: {message}")
    return Unavailable(f"Triton call to {model} failed: {message}")
