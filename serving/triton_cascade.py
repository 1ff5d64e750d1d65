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

Concurrent requests with the same options go to Triton together, in one call, while
`max_in_flight` calls run (serving/call_batcher.py; a lone request is sent at once): the
gateway's client cost and Triton's front end's are paid per call, not per request
(issue 19). Budget requests are sent alone, as they come. Over gRPC the calls are made by
serving/kserve_grpc_client.py (the request's constant part serialized once per options).

As the embedded cascade does (issue 25), it bounds the images in flight
(`max_queue_images`: beyond, `Overloaded`), gives every call the request's
deadline (at most `timeout_s`), polls Triton's health (readiness follows it, and
new requests are refused at once while Triton is down), and on `stop` answers the
calls still running after the grace period `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np

from common.manifest import Manifest
from common.triton_cascade import NORMALISED_INPUT, cascade_model_name
from serving.backends import CONNECT_TIMEOUT_S, GRPC_CHANNEL_ARGS, triton_client, triton_failure, triton_request
from serving.call_batcher import CallBatcher
from serving.cascade import CascadeResult, until_quiet
from serving.errors import DeadlineExceeded, InvalidParameter, Overloaded, Unavailable
from serving.kserve_grpc_client import KServeGrpcClient, constant_part
from serving.metrics import GatewayMetrics
from serving.policy import ExitPlan, RequestOptions

OUTPUTS = ("logits", "exit_depth", "confidence")
# Calls to <model>_cascade at once before requests wait to go together: one that Triton runs and one
# queued behind it keep its instance busy.
MAX_CALLS_IN_FLIGHT = 2
log = logging.getLogger("gateway.triton_cascade")


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
                 metrics: GatewayMetrics | None = None, timeout_s: float = 10.0,
                 max_queue_images: int | None = None, health_interval_s: float = 0.25,
                 max_in_flight: int = MAX_CALLS_IN_FLIGHT) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
        self.plan, self.metrics, self.url, self.protocol, self.timeout_s = plan, metrics, url, protocol, timeout_s
        self.model = cascade_model_name(manifest.model)
        self.max_batch_size = manifest.max_batch_size
        self.depths = np.asarray(plan.depths)
        self.accepting = False
        self.backend_ready = True
        self.in_flight = 0
        self.images_in = 0
        # Triton batches and queues itself: by default a few maximum batches may wait.
        self.max_queue_images = max_queue_images or 4 * manifest.max_batch_size
        self.health_interval_s = health_interval_s
        self.cut = 0
        self.last_refusal = 0.0  # time.monotonic() of the last request refused while stopping
        self.max_in_flight = max_in_flight
        self._batcher: CallBatcher | None = None
        # (request parameters, serialized constant part of a gRPC request) of each options seen
        self._parameters: dict[RequestOptions, tuple[dict, bytes]] = {}
        self._exit_counters: dict[int, object] = {}  # exit position -> its counter (looked up once)
        self._model_metrics = metrics.model(manifest.model) if metrics else None  # its series (`model` label)
        self._health_task: asyncio.Task | None = None
        self._health_client = None  # kept while Triton answers (no new connection per check)
        self._idle: asyncio.Event | None = None
        self._client = None
        if metrics:
            metrics.admitted_images.set_function(lambda: self.images_in)
            metrics.backend_ready.set_function(lambda: float(self.backend_ready))
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

    @property
    def ready(self) -> bool:
        return self.accepting and self.backend_ready

    async def start(self, warmup_input: np.ndarray | None = None) -> None:
        self._client = self._new_client()
        self._batcher = CallBatcher(self._call_with, self.max_batch_size, self.max_in_flight, self.timeout_s)
        self._idle = asyncio.Event()
        self._idle.set()
        if warmup_input is not None:
            warmup = {"policy": "full"}
            await self._call(warmup_input, warmup, constant_part(self.model, OUTPUTS, warmup), self.timeout_s)
        self._health_task = asyncio.create_task(self._watch_health())
        self.accepting = True

    def _new_client(self):
        if self.protocol == "grpc":
            return KServeGrpcClient(self.url, GRPC_CHANNEL_ARGS)
        return triton_client(self.module, self.protocol, self.url, self.timeout_s)

    async def _healthy(self) -> bool:
        """Triton's readiness, on a client kept while it answers (a fresh one after a failed check)."""
        client = self._health_client or triton_client(self.module, self.protocol, self.url, CONNECT_TIMEOUT_S)
        try:
            if self.protocol == "grpc":
                ready = bool(await client.is_server_ready(client_timeout=CONNECT_TIMEOUT_S))
            else:
                ready = bool(await client.is_server_ready())
        except Exception:  # unreachable, frozen or restarting
            ready = False
        if ready:
            self._health_client = client
        else:
            self._health_client = None
            with contextlib.suppress(Exception):
                await client.close()
        return ready

    async def _watch_health(self) -> None:
        """Poll Triton: readiness follows it; a fresh client once it is back."""
        while True:
            healthy = await self._healthy()
            if healthy != self.backend_ready:
                if healthy:
                    old, self._client = self._client, self._new_client()
                    with contextlib.suppress(Exception):
                        await old.close()
                    log.warning("Triton available again")
                else:
                    log.error("Triton unavailable: not ready until it answers its health check again")
                self.backend_ready = healthy
            await asyncio.sleep(self.health_interval_s)

    async def stop(self, timeout: float = 30.0) -> int:
        """Stop accepting, let in-flight requests finish (up to `timeout`), answer the others
        Unavailable, close the client. Returns the number of requests cut."""
        self.accepting = False
        if self._idle is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        cut = 0
        if self.in_flight:
            cut = self.cut = self.in_flight
            if self.metrics:
                self._model_metrics.shutdown_cut.inc(cut)
            log.error("shutdown: requests not finished within the grace period answered UNAVAILABLE",
                      extra={"fields": {"requests": cut, "grace_s": timeout}})
            self._batcher.cut(lambda: Unavailable("the gateway shut down before this request finished"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        await until_quiet(self)
        if self._health_task is not None:
            self._health_task.cancel()
        for client in (self._client, self._health_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        return cut

    async def infer(self, inputs: np.ndarray, options: RequestOptions, deadline: float | None = None) -> CascadeResult:
        """Normalised images through `<model>_cascade` with the request's (resolved) options,
        answered by `deadline` (a time.monotonic()) or DeadlineExceeded."""
        if not self.accepting:
            self.last_refusal = time.monotonic()
            raise Unavailable("the gateway is shutting down")
        if not self.backend_ready:
            raise Unavailable("the backend is not available")
        if self.images_in and self.images_in + len(inputs) > self.max_queue_images:
            raise Overloaded(f"the gateway is at capacity ({self.images_in} images in flight, limit "
                             f"{self.max_queue_images}); retry later")
        timeout_s = self.timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - time.monotonic())
            if timeout_s <= 0:
                raise DeadlineExceeded("the request's deadline passed before it was sent")
        self.in_flight += 1
        self.images_in += len(inputs)
        self._idle.clear()
        size = self.max_batch_size
        # A budget counts from when Triton starts on the call: such requests go alone, at once. The model's
        # max_batch_size bounds a call: larger requests go in concurrent parts, each alone.
        merge = options.policy != "budget" and len(inputs) <= size
        deadline = None if deadline is None else time.monotonic() + timeout_s
        try:
            if len(inputs) <= size:
                logits, depths, confidence = await self._batcher.run(inputs, options, deadline, merge)
            else:
                parts = await asyncio.gather(*(self._batcher.run(inputs[start:start + size], options, deadline, False)
                                               for start in range(0, len(inputs), size)))
                logits, depths, confidence = (np.concatenate(outputs) for outputs in zip(*parts))
        finally:
            self.in_flight -= 1
            self.images_in -= len(inputs)
            if self.in_flight == 0:
                self._idle.set()
        exit_index = np.searchsorted(self.depths, depths).astype(np.int32)
        if self.metrics:
            for index, count in enumerate(np.bincount(exit_index.ravel(), minlength=len(self.depths)).tolist()):
                if count:
                    self._exit_counter(index).inc(count)
        return CascadeResult(logits, exit_index, confidence)

    def _exit_counter(self, index: int):
        counter = self._exit_counters.get(index)
        if counter is None:
            counter = self._exit_counters[index] = self._model_metrics.exit(self.plan.depths[index])
        return counter

    async def _call_with(self, inputs: np.ndarray, options: RequestOptions, timeout_s: float) -> tuple[np.ndarray, ...]:
        """The batcher's call: `inputs` with `options` as request parameters (built once per options)."""
        built = self._parameters.get(options)
        if built is None:
            if len(self._parameters) >= 1024:
                self._parameters.clear()
            parameters = request_parameters(options)
            built = self._parameters[options] = (parameters, constant_part(self.model, OUTPUTS, parameters))
        return await self._call(inputs, *built, timeout_s)

    async def _call(self, inputs: np.ndarray, parameters: dict, constant: bytes,
                    timeout_s: float) -> tuple[np.ndarray, ...]:
        if isinstance(self._client, KServeGrpcClient):
            try:
                outputs = await self._client.infer(constant, NORMALISED_INPUT, "FP32", inputs, timeout_s)
                return tuple(outputs[name] for name in OUTPUTS)
            except Exception as error:  # InferenceServerException, or an answer without an output
                raise _gateway_error(self.model, error) from None
        tensor, requested, timeout = triton_request(self.module, self.protocol, NORMALISED_INPUT, inputs, OUTPUTS,
                                                    timeout_s)
        try:
            result = await self._client.infer(self.model, [tensor], outputs=requested, parameters=parameters,
                                              **timeout)
        except Exception as error:  # tritonclient's InferenceServerException and transport errors
            raise _gateway_error(self.model, error) from None
        return tuple(result.as_numpy(name) for name in OUTPUTS)


def _gateway_error(model: str, error: Exception):
    """Triton's answer as the gateway's error: its 400s stay the client's fault, a passed deadline is
    DeadlineExceeded, the rest is 503 (no addresses or model names in what the client reads)."""
    status = str(getattr(error, "status", lambda: "")() or "")
    message = getattr(error, "message", lambda: str(error))() or str(error)
    if "INVALID_ARG" in status or status == "400":  # the dataplane validated first: rare
        return InvalidParameter(message.replace(model, "the cascade model"))
    return triton_failure(error)
