"""Backends run one cascade stage (a segment model) on a batch. Blocking calls:
the cascade runs them on worker threads (ONNX Runtime and gRPC release the GIL).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from common.manifest import FEATURES_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT, DeployedModel, Manifest
from common.onnxruntime_session import CPU, create_session, execution_providers
from serving.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("gateway.backend")
CONNECT_TIMEOUT_S = 1.0  # to open a connection to Triton, and for a health check
# gRPC channels to Triton retry a lost connection within half a second (the default backoff grows to
# 120 s, which kept the gateway failing for 12.7 s after Triton was back); large messages allowed.
GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                     ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 500)]


class StageBackend(Protocol):
    name: str

    has_exit_models: bool  # whether run_exit works (every exit has a per-exit model)
    # Stages that take the request's normalised images again, not the previous stage's activations
    # (Manifest.image_stages: a composed cascade's later networks); absent means none.
    image_stages: frozenset[int]

    def run(self, stage: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment `stage` on a batch: (logits, activations for the next stage or None)."""

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        """Exit `index`'s per-exit model (the whole prefix) on images: its logits."""

    def close(self) -> None: ...


def _output_names(model: DeployedModel) -> list[str]:
    return [LOGITS_OUTPUT] + ([FEATURES_OUTPUT] if len(model.outputs) > 1 else [])


class OnnxRuntimeBackend:
    """Embedded ONNX Runtime: one session per segment (and per exit model), made by
    the project's one session factory (non-spinning thread pools, see there)."""

    name = "onnxruntime"

    def __init__(self, repository: Path, manifest: Manifest, intra_op_threads: int = 1,
                 device: str = "auto") -> None:
        self.provider = execution_providers(device)[0]
        # On the CPU its calls compete for cores: the cascade runs at most one at a time per core it may use.
        self.cpu_bound = self.provider == CPU

        def session(model: DeployedModel):
            path = Path(repository) / model.name / str(model.version) / "model.onnx"
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: the onnxruntime backend needs the ONNX files")
            # one CPU arena for all, whose growth the idle shrinkage gives back (common/onnxruntime_session.py)
            return create_session(path, intra_op_threads, device, model.parallel_branches, shared_arena=True)

        self.sessions = [session(entry.segment_model) for entry in manifest.exits]
        self.outputs = [_output_names(entry.segment_model) for entry in manifest.exits]
        self.input_names = [entry.segment_model.inputs[0].name for entry in manifest.exits]
        self.image_stages = manifest.image_stages
        self.has_exit_models = all(entry.exit_model is not None for entry in manifest.exits)
        self.exit_sessions = [session(entry.exit_model) for entry in manifest.exits] if self.has_exit_models else []
        # One input row per session, kept from its first call, to run it once with arena shrinkage.
        self._probes: dict[tuple[str, int], np.ndarray] = {}

    def run(self, stage: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if ("segment", stage) not in self._probes:
            self._probes["segment", stage] = inputs[:1].copy()
        results = self.sessions[stage].run(self.outputs[stage], {self.input_names[stage]: inputs})
        return results[0], (results[1] if len(results) > 1 else None)

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        if ("exit", index) not in self._probes:
            self._probes["exit", index] = images[:1].copy()
        return self.exit_sessions[index].run([LOGITS_OUTPUT], {IMAGE_INPUT: images})[0]

    def release_memory(self) -> None:
        """Give the memory ONNX Runtime's arenas grew to under load back (the cascade calls this when
        idle): one batch-1 run of each session with arena shrinkage."""
        import onnxruntime

        options = onnxruntime.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for (kind, index), probe in list(self._probes.items()):
            if kind == "segment" and index < len(self.sessions):
                self.sessions[index].run(self.outputs[index], {self.input_names[index]: probe}, options)
            elif kind == "exit" and index < len(self.exit_sessions):
                self.exit_sessions[index].run([LOGITS_OUTPUT], {IMAGE_INPUT: probe}, options)

    def close(self) -> None:
        self.sessions.clear()
        self.exit_sessions.clear()


def triton_request(module, protocol: str, name: str, inputs: np.ndarray, outputs, timeout_s: float):
    """tritonclient's (input tensor, requested outputs, keyword arguments of `infer`) for FP32
    `inputs` over `protocol` (`module`: tritonclient.http or .grpc, or their aio forms)."""
    tensor = module.InferInput(name, list(inputs.shape), "FP32")
    if protocol == "http":
        tensor.set_data_from_numpy(inputs, binary_data=True)
        requested = [module.InferRequestedOutput(output, binary_data=True) for output in outputs]
        return tensor, requested, {"timeout": int(timeout_s * 1e6)}
    tensor.set_data_from_numpy(inputs)
    return tensor, [module.InferRequestedOutput(output) for output in outputs], {"client_timeout": timeout_s}


def triton_client(module, protocol: str, url: str, timeout_s: float):
    """A blocking or asyncio tritonclient client: short connect timeout, fast gRPC reconnection."""
    if protocol == "grpc":
        return module.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)
    if getattr(module, "__name__", "").endswith(".aio"):
        return module.InferenceServerClient(url, conn_timeout=timeout_s)
    return module.InferenceServerClient(url, connection_timeout=CONNECT_TIMEOUT_S, network_timeout=timeout_s)


def triton_failure(error: Exception, what: str = "the Triton backend"):
    """A tritonclient error as the gateway's, without addresses or internal model names (logged in full)."""
    text = f"{getattr(error, 'status', lambda: '')() or ''} {error}"
    log.warning("Triton call failed", extra={"fields": {"error": str(error)}})
    if "DEADLINE_EXCEEDED" in text or "Deadline Exceeded" in text or "timed out" in text.lower():
        return DeadlineExceeded(f"{what} did not answer within the request's deadline")
    return Unavailable(f"{what} is unavailable")


class TritonBackend:
    """Segments served by a Triton server, called with tritonclient over HTTP or gRPC.

    Triton's own dynamic batcher batches each stage across calls. Every call has a
    deadline (the batch's latest request deadline, at most `timeout_s`); `healthy`
    (polled by the cascade) checks Triton with a short timeout, and `reconnect`
    gives every thread a new client once Triton is back.
    """

    name = "triton"
    accepts_timeout = True

    def __init__(self, manifest: Manifest, url: str, protocol: str = "grpc", timeout_s: float = 10.0) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
        self.manifest, self.url, self.protocol, self.timeout_s = manifest, url, protocol, timeout_s
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe
        self._generation = 0  # bumped by reconnect: threads then make new clients
        self._health_client = None
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        self.models = [entry.segment_model for entry in manifest.exits]
        self.image_stages = manifest.image_stages
        self.has_exit_models = all(entry.exit_model is not None for entry in manifest.exits)
        self.exit_models = [entry.exit_model for entry in manifest.exits] if self.has_exit_models else []
        client = self._client()
        for model in self.models + self.exit_models:
            try:
                ready = client.is_model_ready(model.name, str(model.version))
            except Exception as error:  # tritonclient raises its own exception types
                raise Unavailable(f"Triton at {url} is not reachable: {error}") from None
            if not ready:
                raise Unavailable(f"Triton at {url} has no ready model {model.name} version {model.version}")

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is not None and self._local.generation != self._generation:
            try:
                client.close()
            except Exception:  # a client of a server that went away may not close cleanly
                pass
            client = None
        if client is None:
            client = triton_client(self.module, self.protocol, self.url, self.timeout_s)
            self._local.client, self._local.generation = client, self._generation
        return client

    def healthy(self) -> bool:
        """Whether Triton answers its readiness check within the connect timeout (blocking)."""
        client = self._health_client
        try:
            if client is None:
                if self.protocol == "grpc":
                    client = self.module.InferenceServerClient(self.url, channel_args=GRPC_CHANNEL_ARGS)
                else:
                    client = self.module.InferenceServerClient(self.url, connection_timeout=CONNECT_TIMEOUT_S,
                                                               network_timeout=CONNECT_TIMEOUT_S)
            # Its own models at their versions, not Triton's strict server readiness: that is false while
            # Triton loads or unloads any model (another version of this model during a swap, too).
            timeout = {"client_timeout": CONNECT_TIMEOUT_S} if self.protocol == "grpc" else {}
            ready = all(client.is_model_ready(model.name, str(model.version), **timeout)
                        for model in self.models + self.exit_models)
        except Exception:  # unreachable, frozen or restarting: a fresh client next time
            ready = False
        if ready:
            self._health_client = client
        else:
            self._health_client = None
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
        return bool(ready)

    def reconnect(self) -> None:
        """Triton is back: every thread makes a new client on its next call."""
        self._generation += 1

    def run(self, stage: int, inputs: np.ndarray,
            timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        result = self._infer(self.models[stage], inputs, timeout_s)
        logits = result[0]
        return logits, (result[1] if len(result) > 1 else None)

    def run_exit(self, index: int, images: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        return self._infer(self.exit_models[index], images, timeout_s)[0]

    def _infer(self, model: DeployedModel, inputs: np.ndarray, timeout_s: float | None = None) -> list[np.ndarray]:
        names = _output_names(model)
        timeout_s = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        tensor, requested, kwargs = triton_request(self.module, self.protocol, model.inputs[0].name, inputs,
                                                   names, timeout_s)
        try:
            result = self._client().infer(model.name, [tensor], model_version=str(model.version),
                                          outputs=requested, **kwargs)
        except Exception as error:
            raise triton_failure(error) from None
        return [result.as_numpy(name) for name in names]

    def close(self) -> None:
        for client in (getattr(self._local, "client", None), self._health_client):
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
