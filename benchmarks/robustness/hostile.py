"""The hostile-input phases of the robustness run: bomb (100 decompression-bomb PNGs in one upload)
and fuzz (benchmarks.fuzz's mutated requests over every protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time

from benchmarks.robustness.measure import percentiles, ready, rss_mb, target
from benchmarks.robustness.session import Session
from common.manifest import read_manifest

FUZZ_TARGET_REQUESTS = 50_000


class HostileInputPhases(Session):
    """bomb, fuzz."""

    # bomb -----------------------------------------------------------------------
    def bomb(self) -> dict:
        import httpx
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("1", (7999, 7999)).save(buffer, format="PNG")
        png = buffer.getvalue()
        files = [("files", (f"bomb{i}.png", png, "image/png")) for i in range(100)]
        with self.gateway("bomb") as gateway:
            health: list[float] = []
            stop = threading.Event()

            def poll() -> None:
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        started = time.perf_counter()
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"http://{gateway.http_url}/v2/health/ready")
                        health.append((time.perf_counter() - started) * 1000)
                        time.sleep(0.005)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            time.sleep(0.2)
            # The client (and its connection) is made before the clock starts: the figure is the
            # gateway's refusal, not httpx's start-up (30-60 ms on these VMs).
            with httpx.Client(timeout=120) as client:
                client.get(f"http://{gateway.http_url}/v2/health/live")
                started = time.perf_counter()
                answer = client.post(f"http://{gateway.http_url}/v1/classify", files=files)
                elapsed = (time.perf_counter() - started) * 1000
            time.sleep(0.2)
            stop.set()
            poller.join()
            memory = rss_mb(gateway.process.pid)
        result = {"png_bytes": len(png), "copies": 100, "status": answer.status_code,
                  "answer": answer.text[:300], "refused_after_ms": round(elapsed, 3),
                  "health_latency_ms": percentiles(health), "memory_mb_after": memory}
        self.targets += [
            target("bomb_refused_ms", "refused (4xx) in < 100", round(elapsed, 3),
                   400 <= answer.status_code < 500 and elapsed < 100),
            target("bomb_health_max_ms", "< 50", result["health_latency_ms"].get("max"),
                   bool(health) and max(health) < 50),
        ]
        return result


    # fuzz -----------------------------------------------------------------------
    def fuzz(self) -> dict:
        from benchmarks.fuzz import fuzz

        shape = tuple(read_manifest(self.repository).input.shape)
        requests = int(self.durations["fuzz_requests"])
        with self.gateway("fuzz") as gateway:
            result = asyncio.run(fuzz(gateway.http_url, gateway.grpc_url, self.model, shape, requests))
            result["ready_after"] = ready(gateway.http_url)
        findings = result["bad"] - result["hangs"]
        enough = result["requests"] >= FUZZ_TARGET_REQUESTS
        self.targets += [
            target("fuzz_unexpected_5xx", f"0 unexpected 5xx / UNKNOWN / INTERNAL / dropped / invalid JSON in "
                   f">= {FUZZ_TARGET_REQUESTS} requests (504 for an expired own timeout is expected)",
                   {"findings": findings, "requests": result["requests"]}, findings == 0 and enough),
            target("fuzz_hangs", f"0 in >= {FUZZ_TARGET_REQUESTS} requests",
                   {"hangs": result["hangs"], "requests": result["requests"]},
                   result["hangs"] == 0 and enough and result["ready_after"]),
        ]
        return result

