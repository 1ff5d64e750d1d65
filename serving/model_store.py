"""Several early-exit models, each swapped to a new version while it serves.

The repository holds one manifest per model (common.manifest: `manifest.json`, then
`manifest.<model>.json`). Each loaded model version has its own backend, cascade and
DataPlane; `ModelStore` routes every request by model name to the current version
and is what the HTTP and gRPC front ends call (it answers the DataPlane's calls, plus
the repository extension: index, load, unload).

A new version (a changed manifest: export adds numbered Triton versions and rewrites
it) is loaded beside the old one, warmed up (every stage runs once), then swapped in:
requests already routed to the old version finish there, new ones go to the new one,
and once the old version's requests have drained its cascade stops and its sessions
are closed. A version that does not load (unreadable manifest, missing or corrupt
ONNX, a stage that fails its warm-up) is refused with an error log line and the old
version keeps serving; polling retries it only when its manifest changes again
(an explicit load always retries). Polling also unloads a model whose manifest file has
been removed from the repository (as Triton's poll mode does), the way an explicit
unload does; it loads it again once its manifest is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np

from common.manifest import MANIFEST_FILE, Manifest, ManifestError, list_manifests, manifest_version
from serving.dataplane import SERVER_NAME, SERVER_VERSION, DataPlane, InferRequest, InferResponse
from serving.errors import GatewayError, ModelNotFound, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import RequestOptions

log = logging.getLogger("gateway.models")
READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # Triton's model states in the repository index
READY_WAIT_S = 30.0  # longest a new version's backend may take to report healthy before it is refused


class LoadRefused(GatewayError):
    """A model (version) that cannot be loaded; the version serving before keeps serving."""

    http_status = 400  # as Triton answers a failed load
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotServable(Exception):
    """A model this gateway's backend cannot serve (skipped at start, refused when loaded)."""


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of one model, and the requests inside it."""

    name: str
    version: int
    manifest: Manifest
    fingerprint: str  # of the manifest file's bytes: a changed manifest is a new version
    cascade: object  # serving.cascade.Cascade or serving.triton_cascade.TritonCascade
    dataplane: DataPlane
    source: Path | None = None  # its manifest file
    active: int = 0  # requests routed here and not answered yet
    drained: asyncio.Event | None = None  # set when retired and `active` reaches 0


# (manifest) -> (backend, cascade); blocking (opens sessions): run on a worker thread.
Builder = Callable[[Manifest], tuple[object, object]]


def read_versioned(path: Path) -> tuple[Manifest, str]:
    """The manifest in `path` and the fingerprint of its bytes (read once: no torn reads)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ManifestError(f"manifest {path} is not readable: {error}") from None
    fingerprint = hashlib.sha256(data).hexdigest()[:16]
    try:
        document = json.loads(data)
    except ValueError as error:
        raise ManifestError(f"manifest {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ManifestError(f"manifest {path} is not a JSON object")
    return Manifest.from_dict(document), fingerprint


def fingerprint_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


class ModelStore:
    """The models a gateway serves, by name, each at its current version."""

    def __init__(self, repository: Path, build: Builder, make_dataplane: Callable[[Manifest, object], DataPlane],
                 metrics: GatewayMetrics, default_policy: str, max_request_batch: int,
                 drain_timeout_s: float = 30.0) -> None:
        self.repository = Path(repository)
        self.build, self.make_dataplane, self.metrics = build, make_dataplane, metrics
        self.default_policy, self.max_request_batch = default_policy, max_request_batch
        self.drain_timeout_s = drain_timeout_s
        self.models: dict[str, ModelVersion] = {}  # current version of each loaded model
        self.unloaded: set[str] = set()  # explicitly unloaded: polling leaves them unloaded
        self.refused: dict[str, tuple[str, str]] = {}  # name -> (fingerprint, reason) of the last refusal
        self.retiring: set[ModelVersion] = set()
        self.accepting = True
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self.on_loaded: Callable[[], None] | None = None  # called after a version is loaded (and swapped in)

    # -- loading ---------------------------------------------------------------
    def load_initial(self) -> None:
        """Every model in the repository (blocking: before the event loop runs); any failure is raised."""
        found = list_manifests(self.repository)
        if not found:
            raise ManifestError(f"no manifest.json in {self.repository}: export a model there first")
        for name, path in found.items():
            manifest, fingerprint = read_versioned(path)
            if manifest.model in self.models:
                raise ManifestError(f"{path} is a second manifest of model {manifest.model!r}")
            if name and manifest.model != name:
                raise ManifestError(f"{path} holds the manifest of {manifest.model!r}, not of {name!r}")
            try:
                _, cascade = self.build(manifest)
            except NotServable as error:
                log.warning("model not served", extra={"fields": {"model": manifest.model, "reason": str(error)}})
                self.refused[manifest.model] = (fingerprint, str(error))
                continue
            self.models[manifest.model] = self._version(manifest, fingerprint, cascade, path)
        if not self.models:
            raise ManifestError(f"no model in {self.repository} can be served: " + "; ".join(
                reason for _, reason in self.refused.values()))

    def _version(self, manifest: Manifest, fingerprint: str, cascade, source: Path) -> ModelVersion:
        return ModelVersion(manifest.model, manifest_version(manifest), manifest, fingerprint, cascade,
                            self.make_dataplane(manifest, cascade), source)

    async def start(self, poll_interval_s: float = 0.0) -> None:
        self._lock = asyncio.Lock()
        for version in self.models.values():
            await version.cascade.start(warmup_input=_warmup(version.manifest))
        self._bind_metrics()
        if poll_interval_s > 0:
            self._poll_task = asyncio.create_task(self._poll(poll_interval_s))

    async def load(self, name: str, explicit: bool = True) -> ModelVersion:
        """Load the repository's current version of `name` (a no-op when it is the one serving)."""
        async with self._lock:
            if not self.accepting:
                raise Unavailable("the gateway is shutting down")
            current = self.models.get(name)
            path = list_manifests(self.repository).get(name)
            if path is None and current is not None and current.source.exists():
                path = current.source  # its manifest file is there but unreadable now
            if path is None and current is not None:
                raise LoadRefused(f"no model {name!r} in the repository: its manifest {current.source} is gone; "
                                  f"version {current.version} keeps serving until it is unloaded"
                                  + (" (the next repository poll unloads it)" if self._poll_task else ""))
            if path is None:
                raise LoadRefused(f"no model {name!r} in the repository")
            try:
                manifest, fingerprint = read_versioned(path)
                if manifest.model != name:
                    raise ManifestError(f"{path.name} holds the manifest of {manifest.model!r}, not of {name!r}")
            except ManifestError as error:
                raise self._refuse(name, fingerprint_of(path) or "", str(error), explicit) from None
            if current is not None and current.fingerprint == fingerprint:
                self.unloaded.discard(name)
                return current
            try:
                _, cascade = await asyncio.to_thread(self.build, manifest)
            except Exception as error:  # a missing or corrupt file, an unreachable Triton, ...
                raise self._refuse(name, fingerprint, _reason(error), explicit, manifest_version(manifest),
                                   retry=isinstance(error, Unavailable)) from None
            try:
                await cascade.start(warmup_input=_warmup(manifest))
                await _until_ready(cascade, READY_WAIT_S)
            except Exception as error:  # a stage that does not run, a backend that stays unhealthy
                await _quietly_stop(cascade)
                raise self._refuse(name, fingerprint, _reason(error), explicit, manifest_version(manifest),
                                   retry=isinstance(error, Unavailable)) from None
            loaded = self._version(manifest, fingerprint, cascade, path)
            self.models[name] = loaded
            self._in_repository_order()
            self.unloaded.discard(name)
            self.refused.pop(name, None)
            self._bind_metrics()
            log.info("model version loaded", extra={"fields": {
                "model": name, "version": loaded.version,
                "previous_version": current.version if current else None, "exits": manifest.exit_depths}})
            if current is not None:
                self._retire(current)
            if self.on_loaded is not None:
                self.on_loaded()
            return loaded

    def _in_repository_order(self) -> None:
        """`models` in the repository's order (manifest.json's model first: the default model), however the
        models were unloaded and loaded again (an unreadable manifest.json's model stays first)."""
        listed = list(list_manifests(self.repository))
        place = {name: index for index, name in enumerate(listed)}
        for name, version in self.models.items():
            if name not in place and version.source is not None and version.source.name == MANIFEST_FILE:
                place[name] = -1  # (an unreadable manifest.json: still the first model's)
        ordered = sorted(self.models, key=lambda name: place.get(name, len(listed)))
        if ordered != list(self.models):  # (in place: the same dict for whoever holds it)
            versions = dict(self.models)
            self.models.clear()
            self.models.update((name, versions[name]) for name in ordered)

    def _refuse(self, name: str, fingerprint: str, reason: str, explicit: bool, version: int | None = None,
                retry: bool = False) -> LoadRefused:
        """Log and remember a refused version; the error to raise. `retry`: a passing cause (Triton has
        not loaded the version yet): polling tries the same manifest again."""
        serving = self.models.get(name)
        self.refused[name] = ("" if retry else fingerprint, reason)
        self._bind_metrics()  # the gauges read the versions serving, not the refused one
        log.error("model version refused: " + ("the previous version keeps serving" if serving else "not loaded"),
                  extra={"fields": {"model": name, "version": version, "reason": reason, "explicit": explicit,
                                    "serving_version": serving.version if serving else None}})
        return LoadRefused(f"model {name!r}" + (f" version {version}" if version else "") + f" not loaded: {reason}"
                          + (f"; version {serving.version} keeps serving" if serving else ""))

    async def unload(self, name: str) -> None:
        async with self._lock:
            current = self.models.pop(name, None)
            if current is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            self._bind_metrics()
            log.info("model unloaded", extra={"fields": {"model": name, "version": current.version}})
            self._retire(current)

    async def unload_removed(self) -> list[str]:
        """Unload every model that no manifest in the repository names any more (its manifest file deleted, or
        `manifest.json` now another model's) as an explicit unload does, but not remembered as unloaded:
        polling loads it again when its manifest is back. Nothing is unloaded while the repository directory
        itself is missing (a repository swapped in by two renames). The names unloaded."""
        removed = []
        async with self._lock:
            if not self.accepting or not self.repository.is_dir():
                return removed
            listed = list_manifests(self.repository)
            for name, current in list(self.models.items()):
                if name in listed or current.source is None or listed.get("") == current.source:
                    continue  # (an unreadable manifest.json: the model it held stays, as a failed load leaves it)
                del self.models[name]
                self.refused.pop(name, None)
                removed.append(name)
                self._bind_metrics()
                log.info("model unloaded", extra={"fields": {
                    "model": name, "version": current.version,
                    "reason": "its manifest was removed from the repository", "manifest": current.source.name}})
                self._retire(current)
            for name in set(self.refused) - set(listed) - set(self.models):
                self.refused.pop(name)  # a refused manifest that comes back is tried again
        return removed

    def _retire(self, old: ModelVersion) -> None:
        """Stop `old` once the requests routed to it have finished (at most `drain_timeout_s`)."""
        old.drained = asyncio.Event()
        if old.active == 0:
            old.drained.set()
        self.retiring.add(old)
        task = asyncio.get_running_loop().create_task(self._release(old))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, old: ModelVersion) -> int:
        started = time.monotonic()
        try:
            await asyncio.wait_for(old.drained.wait(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            pass
        cut = await old.cascade.stop(max(0.0, self.drain_timeout_s - (time.monotonic() - started)))
        self.retiring.discard(old)
        self._bind_metrics()
        log.info("previous model version released", extra={"fields": {
            "model": old.name, "version": old.version, "cut": cut,
            "drain_s": round(time.monotonic() - started, 3)}})
        return cut

    async def _poll(self, interval_s: float) -> None:
        """Load new and changed models (not explicitly unloaded ones, not a version refused already); unload
        the models whose manifest was removed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.unload_removed()
                for name, path in list_manifests(self.repository).items():
                    if not name:  # an unreadable manifest.json: the model it held, if one is loaded
                        name = next((v.name for v in self.models.values() if v.source == path), "")
                    fingerprint = fingerprint_of(path)
                    current = self.models.get(name)
                    if current is not None and current.fingerprint == fingerprint:
                        current.source = path  # the same manifest, moved (e.g. to manifest.json)
                    if (not name or name in self.unloaded or fingerprint is None
                            or (current is not None and current.fingerprint == fingerprint)
                            or self.refused.get(name, ("",))[0] == fingerprint):
                        continue
                    try:
                        await self.load(name, explicit=False)
                    except GatewayError:
                        pass  # logged by _refuse; the previous version keeps serving
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository poll failed")

    async def stop(self, grace_s: float) -> int:
        """Shutdown: no new requests; in-flight ones get `grace_s`. Returns the requests cut."""
        self.accepting = False
        if self._poll_task is not None:
            self._poll_task.cancel()
        for task in list(self._tasks):  # retiring versions are stopped here, with the others
            task.cancel()
        versions = [*self.models.values(), *self.retiring]
        for version in versions:
            version.cascade.accepting = False
        cuts = await asyncio.gather(*(version.cascade.stop(grace_s) for version in versions))
        return sum(cuts)

    def _bind_metrics(self) -> None:
        """Each model's queue depth adds up its versions' cascades (the one serving and those draining), the
        admission gauge every model's (each cascade binds them to itself); a model no longer served loses its
        queue depth series."""
        versions = lambda: [*self.models.values(), *self.retiring]  # noqa: E731
        names = {version.name for version in versions()}
        for name in self.metrics.queue_depth_models - names:  # unloaded, or refused before it ever served
            self.metrics.forget_queue_depth(name)
        for name in names:  # (again: a version's cascade binds its model's gauge to itself when made)
            self.metrics.model(name).read_queue_depth(
                lambda name=name: sum(v.cascade.queue_depth for v in versions() if v.name == name))
        self.metrics.admitted_images.set_function(
            lambda: sum(getattr(v.cascade, "images_in", 0) for v in versions()))
        self.metrics.backend_ready.set_function(
            lambda: float(all(getattr(v.cascade, "backend_ready", True) for v in self.models.values())))

    # -- routing: what the front ends call ---------------------------------------
    @property
    def default_model(self) -> str:
        if not self.models:
            raise ModelNotFound("no model is loaded")
        return next(iter(self.models))

    @property
    def manifest(self) -> Manifest:
        """The default model's manifest (the first in the repository)."""
        return self.models[self.default_model].manifest

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Not shutting down, and every loaded model ready."""
        return self.accepting and bool(self.models) and all(v.cascade.ready for v in self.models.values())

    def resolve(self, name: str | None, version: str = "") -> ModelVersion:
        """The current version of model `name` (None or "": the default model)."""
        current = self.models.get(name or self.default_model)
        if current is None:
            raise ModelNotFound(f"unknown model {name!r}; this gateway serves {', '.join(map(repr, self.models))}")
        if version not in ("", str(current.version)):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {current.version}")
        return current

    def check_model(self, name: str, version: str = "") -> ModelVersion:
        if not name:
            raise ModelNotFound("no model name given")
        return self.resolve(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.accepting and self.check_model(name, version).cascade.ready

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION,
                "extensions": ["binary_tensor_data", "classification", "model_repository"]}

    def model_metadata(self, name: str, version: str = "") -> dict:
        current = self.check_model(name, version)
        return {**current.dataplane.model_metadata(name), "versions": [str(current.version)]}

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every model in the repository or loaded, its version and state."""
        entries = {}
        for name in list_manifests(self.repository):
            if name:
                reason = "unloaded" if name in self.unloaded else self.refused.get(name, ("", "not loaded"))[1]
                entries[name] = {"name": name, "version": "", "state": UNAVAILABLE, "reason": reason}
        for name, current in self.models.items():
            ready = self.accepting and current.cascade.ready
            refused = self.refused.get(name)
            entries[name] = {"name": name, "version": str(current.version), "state": READY if ready else UNAVAILABLE,
                             "reason": (f"newer version refused: {refused[1]}" if refused else "")
                             if ready else "not ready"}
        return [entry for entry in entries.values() if entry["state"] == READY or not ready_only]

    async def infer(self, request: InferRequest, protocol: str = "http",
                    timeout_s: float | str | None = None) -> InferResponse:
        current = self.check_model(request.model_name, request.model_version)
        if request.model_version:
            request = replace(request, model_version="")
        current.active += 1
        try:
            response = await current.dataplane.infer(request, protocol, timeout_s)
        finally:
            self._done(current)
        version = str(current.version)
        return response if response.model_version == version else replace(response, model_version=version)

    async def classify(self, images: np.ndarray, options: RequestOptions, top_k: int = 3,
                       model: str | None = None) -> list[dict]:
        current = self.resolve(model)
        current.active += 1
        try:
            return await current.dataplane.classify(images, options, top_k)
        finally:
            self._done(current)

    @staticmethod
    def _done(version: ModelVersion) -> None:
        version.active -= 1
        if version.active == 0 and version.drained is not None:
            version.drained.set()


def _warmup(manifest: Manifest) -> np.ndarray:
    return np.zeros((1, *manifest.input.shape), np.float32)


def _reason(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


async def _until_ready(cascade, at_most_s: float) -> None:
    """Wait until a started cascade is ready (its backend's first health checks: Triton is not ready while
    it still loads or unloads models); Unavailable if it is not within `at_most_s`."""
    deadline = time.monotonic() + at_most_s
    while not cascade.ready:
        if time.monotonic() > deadline:
            raise Unavailable(f"the backend was not ready within {at_most_s:.0f} s")
        await asyncio.sleep(0.05)


async def _quietly_stop(cascade) -> None:
    try:
        await cascade.stop(0)
    except Exception:
        log.exception("stopping a refused model version failed")
