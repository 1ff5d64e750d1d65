"""How much of the budget phase's spread is the host's: the first exit alone, then the budget policy
forced to answer from the first exit (`--budget-reserve 0.99`: no request ever continues), back to back
on one gateway, three pairs at each concurrency; the budget is the p99 the first exit alone just had,
as in the budget phase. Both do the same model work.

    .venv/bin/python benchmarks/results/2026-12-03-vm-robustness-budget/noise.py > noise.jsonl
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Target, closed_loop  # noqa: E402
from benchmarks.robustness.runner import load_workload  # noqa: E402
from benchmarks.servers import GatewayServer  # noqa: E402
from common.manifest import read_manifest  # noqa: E402
from common.provenance import git_commit, machine_description, utc_timestamp  # noqa: E402


def main() -> None:
    repository = ROOT / "model_repository"
    manifest = read_manifest(repository)
    first = manifest.exit_depths[0]
    images, labels, _ = load_workload(repository, None, 2000)
    print(json.dumps({"commit": git_commit(), "machine": machine_description(), "date": utc_timestamp(),
                      "model": manifest.model, "gateway_args": ["--budget-reserve", "0.99"]}), flush=True)
    gateway = GatewayServer(repository, "--budget-reserve", "0.99")
    try:
        for concurrency in (16, 32):
            for pair in range(3):
                fixed = asyncio.run(closed_loop(Target("grpc", gateway.grpc_url, manifest.model,
                                                       {"policy": "fixed", "exit_depth": first}),
                                                images, labels, concurrency, 10**9, 15))
                budget_ms = fixed.latency_ms["p99"]
                parameters = {"policy": "budget", "budget_ms": budget_ms}
                budget = asyncio.run(closed_loop(Target("grpc", gateway.grpc_url, manifest.model, parameters,
                                                        budget_ms=budget_ms),
                                                 images, labels, concurrency, 10**9, 15))
                first_exit = {"rps": round(fixed.throughput, 1), "p50_ms": round(fixed.latency_ms["p50"], 1),
                              "p99_ms": round(budget_ms, 1)}
                only_first = {"rps": round(budget.throughput, 1), "p50_ms": round(budget.latency_ms["p50"], 1),
                              "p99_ms": round(budget.latency_ms["p99"], 1), "exits": budget.exits,
                              "within_budget": round(budget.within_budget, 4)}
                print(json.dumps({"concurrency": concurrency, "pair": pair, "first_exit": first_exit,
                                  "budget_first_exit_only": only_first}), flush=True)
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
