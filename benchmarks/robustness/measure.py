"""Measuring helpers of the robustness run: process memory, percentiles, /metrics lines, one gRPC
caller that records each call's outcome, the refusal-cost estimate, target records, and polling a
gateway's readiness."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process, MB (Linux)."""
    return rss_split_mb(pid).get("rss")


def rss_split_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process, MB (Linux): `rss` in all, `anon` (heaps, arenas: what a process
    holds on to) and `file` (mapped files such as shared libraries' code: clean pages the kernel may drop)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    split = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = fields.get(line.split(maxsplit=1)[0] if line else "")
            if name:
                split[name] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return {}
    return split


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(array, q)), 3) for q in (50, 90, 99)} | {
        "max": round(float(array.max()), 3)}


def samples(text: str, name: str):
    """The samples called `name` (e.g. `gateway_errors_total`) in a /metrics page."""
    for family in text_string_to_metric_families(text):
        yield from (sample for sample in family.samples if sample.name == name)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`: labels not named (a model's, say) are
    summed over, so a reader keeps working when a series gains a label."""
    return sum(sample.value for sample in samples(text, name)
               if all(sample.labels.get(key) == value for key, value in labels.items()))


def entry_images(text: str, first_depth: int) -> float:
    """Images that entered a backend call in a lane requests enter by (stage 0, or a per-exit model)."""
    return sum(sample.value for sample in samples(text, "gateway_stage_batch_size_sum")
               if sample.labels.get("depth") == str(first_depth) or sample.labels.get("depth", "").endswith("-direct"))


def status_name(error: Exception) -> str:
    status = getattr(error, "status", None)
    text = str(status() if callable(status) else "") or type(error).__name__
    return text.removeprefix("StatusCode.")


class Caller:
    """One tritonclient gRPC asyncio client; each call's outcome (`ok` or the gRPC code) and latency."""

    def __init__(self, url: str, model: str) -> None:
        import tritonclient.grpc.aio as module

        self.module, self.model = module, model
        self.client = module.InferenceServerClient(url)

    async def call(self, images: np.ndarray, parameters: dict | None = None,
                   timeout_s: float | None = None) -> tuple[str, float]:
        tensor = self.module.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        started = time.perf_counter()
        try:
            await self.client.infer(self.model, [tensor], parameters=parameters or None, client_timeout=timeout_s)
            outcome = "ok"
        except Exception as error:  # InferenceServerException and transport errors alike
            outcome = status_name(error)
            if outcome == "UNAVAILABLE" and "before this request finished" in str(error):
                outcome = "UNAVAILABLE_CUT"  # in flight at the end of a shutdown's grace period
        return outcome, (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()


def refusal_cost(capacity_cpu: dict | None, overload_cpu: dict | None, served: int, refused: int) -> dict | None:
    """The servers' CPU per refused call under overload, estimated: their CPU in the overload window less
    what the served requests cost at capacity (CPU per request of the closed loop), over the refusals;
    and the share of their CPU that went to refusing. The servers: the gateway, and the front proxy when
    the run has one (both on the same cores)."""
    roles = ("gateway", "front_proxy")
    try:
        if capacity_cpu["ms_per_request"].get("gateway") is None or "gateway" not in overload_cpu["cpu_s"]:
            return None
        per_served = sum(capacity_cpu["ms_per_request"].get(role) or 0.0 for role in roles)
        total_ms = sum(overload_cpu["cpu_s"].get(role) or 0.0 for role in roles) * 1000
    except (KeyError, TypeError):
        return None
    refusing_ms = max(0.0, total_ms - served * per_served)
    return {"servers": [role for role in roles if role in overload_cpu["cpu_s"]],
            "gateway_ms_per_served_at_capacity": round(per_served, 4),
            "gateway_ms_per_refusal": round(refusing_ms / refused, 4) if refused else None,
            "refusing_share_of_gateway_cpu": round(refusing_ms / total_ms, 3) if total_ms else None}


def counts(outcomes: list[str]) -> dict:
    return {name: outcomes.count(name) for name in sorted(set(outcomes))}


def target(name: str, goal: str, measured, met: bool | None) -> dict:
    return {"target": goal, "measured": measured, "met": met, "name": name}



def ready(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"http://{address}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def until(condition, timeout: float, interval: float = 0.01) -> float:
    """Seconds until `condition()` held (polled every `interval`); raises after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started

