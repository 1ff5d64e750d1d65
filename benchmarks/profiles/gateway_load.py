"""Gateway CPU per request under a closed-loop gRPC load (issue 19's profile).

    .venv/bin/python benchmarks/profiles/gateway_load.py --pid PID --url 127.0.0.1:8091 \\
        --model mwresnet56_5 --concurrency 16 --seconds 20 --policy full

`concurrency` asyncio tritonclient.grpc clients send one 32x32x3 UINT8 image per
request (`--per-request N`: N images) (or a normalised FP32 one with --input fp32, as benchmarks/loadgen.py
does). The gateway's CPU (utime + stime from /proc/PID/stat) and the
`gateway_backend_cpu_seconds_total` counter on its /metrics are read before and
after; the script prints one JSON line: requests, throughput, p50 and p99 latency, CPU per request,
backend CPU per request and their difference (the gateway's own cost), and per
stage over the window: samples, mean batch size and backend CPU ms per sample. `--images test` sends the
checkpoint's CIFAR test images (a fixed random order, as benchmarks/run.py picks
them) instead of random ones, so that early exit leaves at the benchmark's exits.
`--direct` measures a server without a gateway /metrics (Triton): CPU only.
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


def scrape(metrics_url: str | None) -> str:
    if not metrics_url:
        return ""
    try:
        return urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return ""


def backend_cpu_s(text: str) -> float | None:
    values = re.findall(r"^gateway_backend_cpu_seconds_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values) if values else None


def stage_batches(text: str) -> dict[str, tuple[float, float, float]]:
    """(batches, samples, backend CPU seconds) of each stage so far, from gateway_stage_batch_size's
    count and sum and gateway_backend_cpu_seconds_total."""
    found: dict[str, list[float]] = {}
    for kind, depth, value in re.findall(r'^gateway_stage_batch_size_(count|sum)\{depth="([^"]+)"[^}]*\} (\S+)$',
                                         text, re.MULTILINE):  # (any model: the profile serves one)
        found.setdefault(depth, [0.0, 0.0, 0.0])[0 if kind == "count" else 1] += float(value)
    for depth, value in re.findall(r'^gateway_backend_cpu_seconds_total\{(?:model="[^"]*",)?stage="([^"]+)"\} (\S+)$',
                                   text, re.MULTILINE):
        found.setdefault(depth, [0.0, 0.0, 0.0])[2] += float(value)
    return {depth: tuple(values) for depth, values in found.items()}


async def load(target: Target, images: np.ndarray, concurrency: int, seconds: float, pid: int,
               metrics_url: str | None, input_name: str = "images", per_request: int = 1) -> dict:
    """Closed loop for `seconds` after a warm-up; what the gateway spent meanwhile."""
    client = grpcclient.InferenceServerClient(target.url)
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    done = 0
    latencies: list[float] = []

    async def one(index: int) -> None:
        start = (index * per_request) % (len(images) - per_request + 1)
        tensor = grpcclient.InferInput(input_name, [per_request, *images.shape[1:]], datatype)
        tensor.set_data_from_numpy(images[start:start + per_request])
        await client.infer(target.model, [tensor], parameters=target.parameters or None)

    for i in range(20):  # warm-up, uncounted
        await one(i)
    text = scrape(metrics_url)
    cpu_before, backend_before, batches_before = process_cpu_s(pid), backend_cpu_s(text), stage_batches(text)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await one(index)
            latencies.append(time.perf_counter() - sent)
            done += 1
            index += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_after = process_cpu_s(pid)
    text = scrape(metrics_url)
    backend_after, batches_after = backend_cpu_s(text), stage_batches(text)
    await client.close()
    cpu_ms = (cpu_after - cpu_before) * 1000 / done
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    result = {"requests": done, "throughput": round(done / elapsed, 1), "p50_ms": round(float(p50), 3),
              "p99_ms": round(float(p99), 3), "gateway_cpu_ms": round(cpu_ms, 3)}
    if backend_before is not None and backend_after is not None:
        backend_ms = (backend_after - backend_before) * 1000 / done
        result |= {"backend_cpu_ms": round(backend_ms, 3), "outside_backend_cpu_ms": round(cpu_ms - backend_ms, 3)}
    stages = {}
    for depth, (count, total, cpu) in batches_after.items():
        count0, total0, cpu0 = batches_before.get(depth, (0.0, 0.0, 0.0))
        if count > count0:
            samples = total - total0
            stages[depth] = [int(samples), round(samples / (count - count0), 2),
                             round((cpu - cpu0) * 1000 / samples, 3)]
    if stages:
        result["stage_samples_mean_batch_cpu_ms_per_sample"] = stages
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    parser.add_argument("--url", default="127.0.0.1:8091", help="the gateway's gRPC address")
    parser.add_argument("--metrics-url", default="http://127.0.0.1:8090/metrics")
    parser.add_argument("--model", default="mwresnet56_5")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="full")
    parser.add_argument("--input", choices=("uint8", "fp32"), default="uint8")
    parser.add_argument("--images", choices=("random", "test"), default="random",
                        help="random images, or the checkpoint's test split (as the benchmark sends)")
    parser.add_argument("--repository", default="model_repository", help="its manifest names the test split")
    parser.add_argument("--direct", action="store_true", help="no gateway /metrics to read (Triton itself)")
    parser.add_argument("--input-name", default="images",
                        help="normalised_images: FP32 images sent to <model>_cascade directly")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=1, help="images per request (the benchmark's batch8: 8)")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, 32, 32, 3), dtype=np.uint8)
    if args.images == "test":
        from benchmarks.exit_outputs import load_images
        from common.manifest import read_manifest
        from serving.normalisation import normalise_uint8

        manifest = read_manifest(args.repository)
        test_images, _ = load_images(manifest, "test")
        images = test_images[np.random.default_rng(0).permutation(len(test_images))[:4000]]
        if args.input == "fp32":  # as benchmarks/run.py normalises them
            images = normalise_uint8(images, manifest.mean, manifest.std)
    elif args.input == "fp32":
        images = ((images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25).astype(np.float32)
    target = Target("grpc", args.url, args.model, POLICIES[args.policy])
    metrics_url = None if args.direct else args.metrics_url
    measured = asyncio.run(load(target, images, args.concurrency, args.seconds, args.pid, metrics_url,
                                args.input_name, args.per_request))
    print(json.dumps({"policy": args.policy, "input": args.input, "images": args.images,
                      "per_request": args.per_request, "concurrency": args.concurrency} | measured),
          flush=True)


if __name__ == "__main__":
    main()
