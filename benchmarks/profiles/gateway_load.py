"""Gateway CPU per request under a closed-loop gRPC load (issue 19's profile).

    .venv/bin/python benchmarks/profiles/gateway_load.py --pid PID --url 127.0.0.1:8091 \\
        --model mwresnet56_5 --concurrency 16 --seconds 20 --policy full

`concurrency` asyncio tritonclient.grpc clients send one 32x32x3 UINT8 image per
request (or a normalised FP32 one with --input fp32, as benchmarks/loadgen.py
does). The gateway's CPU (utime + stime from /proc/PID/stat) and the
`gateway_backend_cpu_seconds_total` counter on its /metrics are read before and
after; the script prints one JSON line: requests, throughput, CPU per request,
backend CPU per request and their difference (the gateway's own cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
import urllib.request

import numpy as np
import tritonclient.grpc.aio as grpcclient

from benchmarks.loadgen import Target

TICKS = os.sysconf("SC_CLK_TCK")
POLICIES = {"full": {"policy": "full"}, "fixed15": {"policy": "fixed", "exit_depth": 15}, "early": {}}


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def backend_cpu_s(metrics_url: str) -> float | None:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return None
    values = re.findall(r"^gateway_backend_cpu_seconds_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values) if values else None


async def load(target: Target, images: np.ndarray, concurrency: int, seconds: float, pid: int,
               metrics_url: str) -> dict:
    """Closed loop for `seconds` after a warm-up; what the gateway spent meanwhile."""
    client = grpcclient.InferenceServerClient(target.url)
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    done = 0

    async def one(index: int) -> None:
        tensor = grpcclient.InferInput("images", [1, *images.shape[1:]], datatype)
        tensor.set_data_from_numpy(images[index % len(images)][None])
        await client.infer(target.model, [tensor], parameters=target.parameters or None)

    for i in range(20):  # warm-up, uncounted
        await one(i)
    cpu_before, backend_before = process_cpu_s(pid), backend_cpu_s(metrics_url)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            await one(index)
            done += 1
            index += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_after, backend_after = process_cpu_s(pid), backend_cpu_s(metrics_url)
    await client.close()
    cpu_ms = (cpu_after - cpu_before) * 1000 / done
    result = {"requests": done, "throughput": round(done / elapsed, 1), "gateway_cpu_ms": round(cpu_ms, 3)}
    if backend_before is not None and backend_after is not None:
        backend_ms = (backend_after - backend_before) * 1000 / done
        result |= {"backend_cpu_ms": round(backend_ms, 3), "outside_backend_cpu_ms": round(cpu_ms - backend_ms, 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    parser.add_argument("--url", default="127.0.0.1:8091", help="the gateway's gRPC address")
    parser.add_argument("--metrics-url", default="http://127.0.0.1:8090/metrics")
    parser.add_argument("--model", default="mwresnet56_5")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="full")
    parser.add_argument("--input", choices=("uint8", "fp32"), default="uint8")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, 32, 32, 3), dtype=np.uint8)
    if args.input == "fp32":
        images = ((images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25).astype(np.float32)
    target = Target("grpc", args.url, args.model, POLICIES[args.policy])
    measured = asyncio.run(load(target, images, args.concurrency, args.seconds, args.pid, args.metrics_url))
    print(json.dumps({"policy": args.policy, "input": args.input, "concurrency": args.concurrency} | measured),
          flush=True)


if __name__ == "__main__":
    main()
