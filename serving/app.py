"""Assemble the gateway: per model in the repository, manifest -> backend -> cascade ->
dataplane; a model store routing by name (serving.model_store) -> HTTP + gRPC."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from common.errors import UserError
from common.manifest import Manifest, ManifestError, read_manifest
from serving import heap
from serving.backends import OnnxRuntimeBackend, StageBackend, TritonBackend
from serving.cascade import Cascade, CascadeSettings, default_queue_images
from serving.dataplane import DataPlane
from serving.errors import Unavailable
from serving.grpc_api import GrpcLimits, concurrent_rpc_limit, start_grpc_server
from serving.http_api import HttpOptions, create_http_app
from serving.metrics import GatewayMetrics
from serving.model_store import ModelStore
from serving.policy import exit_plan
from serving.settings import Settings
from serving.triton_cascade import TritonCascade

log = logging.getLogger("gateway")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to ship and to grep."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def load_manifest(repository: Path) -> Manifest:
    try:
        return read_manifest(repository)
    except ManifestError as error:
        raise UserError(str(error)) from None


def stage_backend(settings: Settings, manifest: Manifest) -> StageBackend:
    """The backend running `manifest`'s stages (FileNotFoundError, Unavailable when it cannot)."""
    if settings.backend == "onnxruntime":
        return OnnxRuntimeBackend(settings.model_repository, manifest, settings.intra_op_threads, settings.device)
    return TritonBackend(manifest, settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)


def make_backend(settings: Settings, manifest: Manifest) -> StageBackend:
    if settings.backend == "onnxruntime":
        try:
            return OnnxRuntimeBackend(settings.model_repository, manifest, settings.intra_op_threads,
                                      settings.device)
        except FileNotFoundError as error:
            raise UserError(str(error)) from None
    try:
        return TritonBackend(manifest, settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)
    except Unavailable as error:
        raise UserError(str(error)) from None


def make_triton_cascade(settings: Settings, manifest: Manifest, plan, metrics: GatewayMetrics) -> TritonCascade:
    try:
        return TritonCascade(manifest, plan, settings.triton_url, settings.triton_protocol, metrics,
                             settings.triton_timeout_s, settings.max_queue_images or None,
                             settings.health_interval_ms / 1000)
    except Unavailable as error:
        raise UserError(str(error)) from None


def ensure_triton_models(settings: Settings, manifest: Manifest) -> None:
    """Ask Triton to load the manifest's models that it does not have ready at their versions (Triton in
    explicit model-control mode loads them; in poll mode it loads them itself, and in none mode it refuses,
    which leaves TritonBackend's readiness check to say what is missing)."""
    if settings.triton_protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    from serving.backends import triton_client

    client = triton_client(module, settings.triton_protocol, settings.triton_url, settings.triton_timeout_s)
    try:
        deployed = [entry.segment_model for entry in manifest.exits]
        deployed += [entry.exit_model for entry in manifest.exits if entry.exit_model is not None]
        for model in deployed:
            try:
                if not client.is_model_ready(model.name, str(model.version)):
                    client.load_model(model.name)
            except Exception as error:  # none mode, or Triton unreachable: the backend's check reports it
                log.debug("Triton did not load a model", extra={"fields": {"model": model.name,
                                                                           "error": str(error)}})
    finally:
        client.close()


def profiled_stage_ms(manifest: Manifest) -> list[float | None]:
    """Batch-1 latency of each segment from the manifest's profile, if profiled."""
    return [entry.latency_ms.get("segment_model", {}).get("1") for entry in manifest.exits]


def profiled_image_ms(manifest: Manifest) -> float | None:
    """The full cascade's profiled cost per image at the largest profiled batch, if profiled."""
    total = 0.0
    for entry in manifest.exits:
        table = entry.latency_ms.get("segment_model", {})
        if not table:
            return None
        batch = max(table, key=int)
        total += table[batch] / int(batch)
    return total


def optional_nice(settings: Settings) -> int | None:
    """The nice value of the budget policy's optional-stage thread (None: no such thread)."""
    nice = settings.backend_nice if settings.optional_nice is None else settings.optional_nice
    return None if nice < 0 else nice


def parallel_workers(workers: int) -> int:
    """Backend calls that really run at once: `workers`, at most the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(workers, cores))


def http_options(settings: Settings, max_body_bytes: int) -> HttpOptions:
    return HttpOptions(max_body_bytes=max_body_bytes, max_image_bytes=int(settings.max_image_mb * 1024 * 1024),
                       max_image_pixels=settings.max_image_pixels, max_request_pixels=settings.max_request_pixels,
                       decode_threads=settings.decode_threads, docs=settings.docs,
                       api_key=settings.api_key.get_secret_value() if settings.api_key else None)


def grpc_security(settings: Settings) -> dict:
    """start_grpc_server's keywords: the API key, and TLS when a certificate is given."""
    tls = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes()) if settings.tls_cert else None
    return {"api_key": settings.api_key.get_secret_value() if settings.api_key else None, "tls": tls}


def grpc_limits(settings: Settings, admission_images: int | None) -> GrpcLimits:
    """The gRPC front end's limits: calls at once from the admission bound (`admission_images`, summed
    over the models served at start-up), the HTTP connection limit and read timeout where grpc has them.
    grpc.aio cannot change its limit once the server runs, and a model loaded later may be any model (a
    fast one's bound has no ceiling), so the default does not count models loaded later:
    `grpc_limit_warning` says when they admit more than it."""
    return GrpcLimits(max_concurrent_rpcs=settings.grpc_max_concurrent_rpcs or concurrent_rpc_limit(admission_images),
                      max_connections=settings.max_connections, handshake_timeout_s=settings.read_timeout_s,
                      age_grace_s=max(settings.read_timeout_s, settings.request_timeout_s),
                      max_pending_calls=settings.grpc_max_pending_calls or None)


def admission_images(store: ModelStore) -> int | None:
    """Images admitted at once over every model served (None when one of them has no bound)."""
    total = 0
    for version in store.models.values():
        cascade = version.cascade
        bound = getattr(cascade, "max_queue_images", None) or getattr(
            getattr(cascade, "settings", None), "max_queue_images", 0)
        if not bound:
            return None
        total += bound
    return total or None


def grpc_limit_warning(limit: int | None, store: ModelStore) -> str | None:
    """Why gRPC's default limit on calls at once (`limit`, fixed at start-up) now refuses calls that the
    models served admit (None when it does not): a model loaded later was not counted in it."""
    admitted = admission_images(store)
    if limit is None or (admitted is not None and admitted <= limit):
        return None
    return (f"gRPC's limit on calls at once ({limit}, the admission bound of the models served at start-up) is "
            f"below what the models served now admit ({admitted or 'without bound'} images: "
            f"{', '.join(store.models)}): gRPC refuses calls beyond it RESOURCE_EXHAUSTED before a model's "
            "admission sees them, and grpc cannot change it while it runs; set --grpc-max-concurrent-rpcs "
            "(EE_GRPC_MAX_CONCURRENT_RPCS) for a gateway that loads models later, or restart this one")


class Gateway:
    """Everything one gateway process runs: every model of the repository (a backend, cascade and
    dataplane per model version) behind one model store, which both front ends call."""

    def __init__(self, settings: Settings, backend: StageBackend | None = None) -> None:
        self.settings = settings
        # before the backends and front ends allocate: large buffers get pages of their own (serving/heap.py)
        self.mmap_threshold_fixed = heap.fix_mmap_threshold(settings.mmap_threshold_kb * 1024)
        self.malloc_arenas_limited = heap.limit_arenas(settings.malloc_arenas)  # and the threads share arenas
        self.metrics = GatewayMetrics()
        self._given_backend = backend  # a caller's backend: the first model's
        self.store = ModelStore(settings.model_repository, self.build, self.make_dataplane, self.metrics,
                                settings.default_policy, settings.max_request_batch,
                                drain_timeout_s=settings.shutdown_grace_s)
        try:
            self.store.load_initial()
        except (ManifestError, FileNotFoundError, Unavailable) as error:
            raise UserError(str(error)) from None
        first = self.store.models[self.store.default_model]
        self.manifest, self.cascade = first.manifest, first.cascade  # the default model's
        self.backend = getattr(self.cascade, "backend", self.cascade)
        self.dataplane = self.store  # what the front ends call: it routes by model name
        self.cut = 0  # requests the shutdown answered UNAVAILABLE (the exit status says so)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Task | None = None
        self.grpc_server = None
        self.max_body_bytes = int(settings.max_body_mb * 1024 * 1024)
        self.http_app = create_http_app(self.dataplane, http_options(settings, self.max_body_bytes),
                                        lifespan=self.lifespan)

    def request_shutdown(self) -> None:
        """From the SIGTERM/SIGINT handler (any thread): start the shutdown on the event loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    def begin_shutdown(self) -> asyncio.Task:
        """Readiness false and no new requests on either front end at once; in-flight requests get
        `shutdown_grace_s`, then whatever is left is answered UNAVAILABLE (counted in `cut`)."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._drain())
        return self._shutdown

    async def _drain(self) -> None:
        grace = self.settings.shutdown_grace_s
        log.info("shutting down: finishing in-flight requests", extra={"fields": {"grace_s": grace}})
        # Readiness goes false first; from now on both front ends answer new requests UNAVAILABLE at once
        # (uvicorn also stops listening). gRPC's own stop would answer calls still on the wire CANCELLED,
        # so it comes after the drain, when every request has its answer.
        self.store.accepting = False
        self.cut = await self.store.stop(grace)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1)
        if self.cut:
            log.error("shutdown cut requests: answered UNAVAILABLE", extra={"fields": {"requests": self.cut}})

    def build(self, manifest: Manifest):
        """(backend, cascade) of one model version (blocking: opens its sessions or checks Triton)."""
        settings = self.settings
        plan = exit_plan(manifest, settings.default_threshold)
        backend, self._given_backend = self._given_backend, None
        if settings.backend == "triton-cascade" and backend is None:  # the whole cascade in Triton
            cascade = TritonCascade(manifest, plan, settings.triton_url, settings.triton_protocol, self.metrics,
                                    settings.triton_timeout_s, settings.max_queue_images or None,
                                    settings.health_interval_ms / 1000)
            return cascade, cascade
        if settings.backend != "onnxruntime" and backend is None:
            ensure_triton_models(settings, manifest)
        backend = backend or stage_backend(settings, manifest)
        queue_images = settings.max_queue_images or default_queue_images(
            profiled_image_ms(manifest), parallel_workers(settings.workers), settings.max_queue_ms,
            settings.max_batch_size)
        cascade_settings = CascadeSettings(settings.max_batch_size, settings.max_wait_ms, settings.workers,
                                           max_queue_images=queue_images,
                                           health_interval_s=settings.health_interval_ms / 1000,
                                           backend_nice=settings.backend_nice, budget_reserve=settings.budget_reserve,
                                           optional_nice=optional_nice(settings))
        fallback = None
        if settings.backend == "triton" and settings.triton_fallback and backend.name == "triton":
            fallback = stage_backend(settings.model_copy(update={"backend": "onnxruntime"}), manifest)
        return backend, Cascade(backend, plan, cascade_settings, self.metrics, profiled_stage_ms(manifest),
                                fallback=fallback, model=manifest.model)

    def make_dataplane(self, manifest: Manifest, cascade) -> DataPlane:
        settings = self.settings
        return DataPlane(manifest, cascade, self.metrics, settings.default_policy, settings.max_request_batch,
                         settings.request_timeout_s)

    def _check_grpc_limit(self, limit: int | None) -> None:
        warning = grpc_limit_warning(limit, self.store)
        if warning:
            log.warning("grpc limit below the admission of the models served", extra={"fields": {
                "grpc_max_concurrent_rpcs": limit, "admission_images": admission_images(self.store),
                "detail": warning}})

    @asynccontextmanager
    async def lifespan(self, app):
        self._loop = asyncio.get_running_loop()
        await self.store.start(self.settings.poll_repository_s)
        if self.settings.grpc_port >= 0:
            limits = grpc_limits(self.settings, admission_images(self.store))
            self.grpc_server = await start_grpc_server(self.dataplane, self.settings.host, self.settings.grpc_port,
                                                       self.max_body_bytes, **grpc_security(self.settings),
                                                       limits=limits)
            if not self.settings.grpc_max_concurrent_rpcs:  # the default: say when a later load outgrows it
                self.store.on_loaded = lambda: self._check_grpc_limit(limits.max_concurrent_rpcs)
        # What start-up made (modules, sessions, schemas: most of the heap's objects) is never garbage: out
        # of the collector's sight, so that a full collection under load walks only what requests made
        # (tens of ms less of a stalled event loop each time).
        gc.collect()
        gc.freeze()
        log.info("gateway ready", extra={"fields": {
            "model": self.manifest.model, "exits": self.manifest.exit_depths, "backend": self.backend.name,
            "models": {name: version.version for name, version in self.store.models.items()},
            "poll_repository_s": self.settings.poll_repository_s or None,
            "event_loop": type(asyncio.get_running_loop()).__module__,
            "http": f"{self.settings.host}:{self.settings.http_port}",
            "grpc": f"{self.settings.host}:{self.settings.grpc_port}" if self.grpc_server else None,
            # images admitted into the cascades at once (None: unbounded): a front proxy's limit on requests
            # in flight (deploy/nginx) goes at or below it, so that the proxy refuses first
            "admission_images": admission_images(self.store),
            "mmap_threshold_kb": self.settings.mmap_threshold_kb if self.mmap_threshold_fixed else None,
            "malloc_arenas": self.settings.malloc_arenas if self.malloc_arenas_limited else None}})
        try:
            yield
        finally:
            await self.begin_shutdown()
            self.http_app.state.image_decoder.close()
            log.info("stopped")
