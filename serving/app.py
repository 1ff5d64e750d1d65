"""Assemble the gateway: manifest -> backend -> cascade -> dataplane -> HTTP + gRPC."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.manifest import Manifest, ManifestError, read_manifest
from serving.backends import OnnxRuntimeBackend, StageBackend, TritonBackend
from serving.cascade import Cascade, CascadeSettings
from serving.dataplane import DataPlane
from serving.errors import Unavailable
from serving.grpc_api import start_grpc_server
from serving.http_api import create_http_app
from serving.metrics import GatewayMetrics
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


def make_backend(settings: Settings, manifest: Manifest) -> StageBackend:
    if settings.backend == "onnxruntime":
        try:
            return OnnxRuntimeBackend(settings.model_repository, manifest, settings.intra_op_threads,
                                      settings.device)
        except FileNotFoundError as error:
            raise UserError(str(error)) from None
    try:
        return TritonBackend(manifest, settings.triton_url, settings.triton_protocol)
    except Unavailable as error:
        raise UserError(str(error)) from None


def make_triton_cascade(settings: Settings, manifest: Manifest, plan, metrics: GatewayMetrics) -> TritonCascade:
    try:
        return TritonCascade(manifest, plan, settings.triton_url, settings.triton_protocol, metrics)
    except Unavailable as error:
        raise UserError(str(error)) from None


def profiled_stage_ms(manifest: Manifest) -> list[float | None]:
    """Batch-1 latency of each segment from the manifest's profile, if profiled."""
    return [entry.latency_ms.get("segment_model", {}).get("1") for entry in manifest.exits]


class Gateway:
    """Everything one gateway process runs; the front ends share its dataplane."""

    def __init__(self, settings: Settings, backend: StageBackend | None = None) -> None:
        self.settings = settings
        self.manifest = load_manifest(settings.model_repository)
        self.metrics = GatewayMetrics()
        plan = exit_plan(self.manifest, settings.default_threshold)
        if settings.backend == "triton-cascade" and backend is None:  # the whole cascade in Triton
            self.cascade = self.backend = make_triton_cascade(settings, self.manifest, plan, self.metrics)
        else:
            self.backend = backend or make_backend(settings, self.manifest)
            cascade_settings = CascadeSettings(settings.max_batch_size, settings.max_wait_ms, settings.workers)
            self.cascade = Cascade(self.backend, plan, cascade_settings, self.metrics,
                                   profiled_stage_ms(self.manifest))
        self.dataplane = DataPlane(self.manifest, self.cascade, self.metrics, settings.default_policy,
                                   settings.max_request_batch)
        self.grpc_server = None
        self.max_body_bytes = int(settings.max_body_mb * 1024 * 1024)
        self.http_app = create_http_app(self.dataplane, self.max_body_bytes, lifespan=self.lifespan)

    @asynccontextmanager
    async def lifespan(self, app):
        warmup = np.zeros((1, *self.manifest.input.shape), np.float32)
        await self.cascade.start(warmup_input=warmup)
        if self.settings.grpc_port >= 0:
            self.grpc_server = await start_grpc_server(self.dataplane, self.settings.host, self.settings.grpc_port,
                                                       self.max_body_bytes)
        log.info("gateway ready", extra={"fields": {
            "model": self.manifest.model, "exits": self.manifest.exit_depths, "backend": self.backend.name,
            "event_loop": type(asyncio.get_running_loop()).__module__,
            "http": f"{self.settings.host}:{self.settings.http_port}",
            "grpc": f"{self.settings.host}:{self.settings.grpc_port}" if self.grpc_server else None}})
        try:
            yield
        finally:
            log.info("shutting down: finishing in-flight requests")
            if self.grpc_server is not None:
                await self.grpc_server.stop(grace=10)
            await self.cascade.stop()
            log.info("stopped")
