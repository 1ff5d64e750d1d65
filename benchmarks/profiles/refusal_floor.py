"""What a refused gRPC call costs a Python (grpc.aio) server with no gateway code: the floor under the
robustness run's `refusal_cost_estimate` (issue 25, overload).

    .venv/bin/python benchmarks/profiles/refusal_floor.py --output benchmarks/profiles/refusal-floor.jsonl

For each variant, the bare KServe servicer (bare_servicer.py) is started on the first core and an
open loop of one-image ModelInfer calls (benchmarks.loadgen.raw_open_loop, pre-serialized messages,
the overload phase's generator) is sent from the second core at --rate for --seconds:
- `grpc-limit`: grpc's own concurrent-RPC limit at 1 with answers held --delay-ms: every call but about
  one per delay is refused RESOURCE_EXHAUSTED by grpc before its message is read (the gateway's
  `--grpc-max-concurrent-rpcs` refusal);
- `handler`: every call read, parsed and aborted RESOURCE_EXHAUSTED by the servicer (a refusal by the
  gateway's admission, less its own checks; the generator's first message, 1 in 64, is answered: it is
  the one its connections warm up with);
- `answer`: every call answered at once (a full KServe answer with no model, for scale).
The server's CPU (from /proc, its whole process) over the window divided by the calls answered is the
CPU per call; one JSON line per variant and round goes to --output. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu import process_cpu_s  # noqa: E402
from benchmarks.loadgen import infer_messages, raw_open_loop  # noqa: E402

VARIANTS = {"grpc-limit": ["--max-concurrent-rpcs", "1"], "handler": ["--refuse"], "answer": []}


def _wait_for_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the bare servicer did not listen on {port}")


def _with_id(message: bytes, request_id: str) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest.FromString(message)
    request.id = request_id
    return request.SerializeToString()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(variant: str, rate: float, seconds: float, delay_ms: float, port: int, server_core: int,
            messages: list[bytes]) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks/profiles/bare_servicer.py"), "--port", str(port),
               "--delay-ms", str(delay_ms if variant == "grpc-limit" else 0), *VARIANTS[variant]]
    server = subprocess.Popen(command, preexec_fn=lambda: os.sched_setaffinity(0, {server_core}))
    try:
        _wait_for_port(port)
        url = f"127.0.0.1:{port}"
        # warm-up (connections, first calls) outside the window
        asyncio.run(raw_open_loop(url, messages, min(rate, 200.0), 1.0))
        before = process_cpu_s(server.pid)
        load = asyncio.run(raw_open_loop(url, messages, rate, seconds))
        cpu_s = process_cpu_s(server.pid) - before
    finally:
        server.terminate()
        server.wait(10)
    codes: dict[str, int] = {}
    for outcome in load.outcomes:
        codes[outcome] = codes.get(outcome, 0) + 1
    refused = [ms for ms, outcome in zip(load.latency_ms, load.outcomes) if outcome == "RESOURCE_EXHAUSTED"]
    return {"variant": variant, "rate": rate, "seconds": seconds, "sent": load.sent, "outcomes": codes,
            "server_cpu_s": round(cpu_s, 3), "server_cpu_ms_per_call": round(cpu_s * 1000 / max(1, load.sent), 4),
            "refusal_latency_ms": ({"p50": round(float(np.percentile(refused, 50)), 2),
                                    "p99": round(float(np.percentile(refused, 99)), 2)} if refused else None),
            "examples": load.examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="JSON lines appended, one per variant and round")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--rate", type=float, default=1000.0, help="calls per second offered (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load window per variant (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="the variants alternate this many times")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="grpc-limit: how long the one admitted call is "
                        "held (default %(default)s)")
    parser.add_argument("--port", type=int, default=8093)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error("needs two cores: the server on one, the load generator on another")
    server_core, load_cores = cores[0], set(cores[1:])
    os.sched_setaffinity(0, load_cores)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    images = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    messages = infer_messages("bare", images, 64)
    messages[1:] = [_with_id(message, "refuse") for message in messages[1:]]  # handler: refused in the servicer
    stamp = {"commit": _commit(), "machine": platform.node(), "cores": len(cores),
             "server_core": server_core, "load_cores": sorted(load_cores),
             "command": " ".join([Path(sys.executable).name, *sys.argv]),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with args.output.open("a") as output:
        for round_ in range(1, args.rounds + 1):
            for variant in variants:
                record = {"round": round_, **measure(variant, args.rate, args.seconds, args.delay_ms, args.port,
                                                     server_core, messages), **stamp}
                output.write(json.dumps(record) + "\n")
                output.flush()
                print(f"round {round_} {variant}: {record['server_cpu_ms_per_call']} ms CPU a call, "
                      f"{record['outcomes']}, refusals {record['refusal_latency_ms']}", flush=True)


if __name__ == "__main__":
    main()
