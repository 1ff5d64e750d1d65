"""The latency-accuracy benchmark: what early exit buys over serving the full network,
side by side in one run on this machine.

    python -m benchmarks.run            # short: a few minutes (make bench)
    python -m benchmarks.run --full     # all concurrency levels, longer levels

Steps: calibrate thresholds on the held-out split (written into the repository's
manifest); sweep targets offline on the test split (with fixed exits and the
oracle); then load real test images over gRPC and HTTP, closed loop over
concurrency levels and open loop at Poisson rates, against: the full network
through the gateway, the full network called directly on Triton, early exit on
the embedded ONNX Runtime backend and on the Triton backend, each fixed exit,
and the latency-budget policy at several budgets. Writes
benchmarks/results/<date>-<machine>/ with CSV/JSON per scenario, plots, a
REPORT.md and a summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.calibrate import apply_thresholds, calibrate
from benchmarks.exit_outputs import compute_exit_outputs, load_images
from benchmarks.loadgen import LevelResult, Target, closed_loop, open_loop
from benchmarks.report import write_report
from benchmarks.servers import GatewayServer
from benchmarks.sweep import offline_sweep
from benchmarks.triton_launcher import DEFAULT_VENV, TritonServer, triton_installed
from common.errors import UserError, run_cli
from common.manifest import Manifest, ManifestError, read_manifest, write_manifest
from serving.preprocess import normalise_uint8

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    headline_concurrency: int
    requests: int
    seconds: float
    rates: tuple[float, ...]
    # Budgets as multiples of the shallowest exit's p99 at the headline level: below 1x even
    # the first exit cannot answer every request in time.
    budget_factors: tuple[float, ...]
    images: int


SHORT = Plan((1, 4, 16), 16, 600, 8.0, (50.0, 150.0), (1.0, 1.5, 2.0, 3.0), 2000)
FULL = Plan((1, 2, 4, 8, 16, 32), 16, 4000, 30.0, (50.0, 100.0, 200.0), (1.0, 1.25, 1.5, 2.0, 3.0), 10000)


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_name() -> str:
    import os

    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'})"


class Benchmark:
    def __init__(self, repository: Path, output: Path, plan: Plan, log=print) -> None:
        self.repository, self.output, self.plan, self.log = repository, output, plan, log
        self.scenarios: dict[str, list[dict]] = {}
        try:
            self.manifest: Manifest = read_manifest(repository)
        except ManifestError as error:
            raise UserError(str(error)) from None

    # -- offline -------------------------------------------------------------
    def calibrate_and_sweep(self) -> list[dict]:
        self.log("computing every exit's outputs on the held-out and test splits")
        heldout = compute_exit_outputs(self.repository, self.manifest, *load_images(self.manifest, "heldout"))
        test_images, test_labels = load_images(self.manifest, "test")
        test = compute_exit_outputs(self.repository, self.manifest, test_images, test_labels)
        macs = [entry.macs for entry in self.manifest.exits]
        thresholds, details = calibrate(heldout, macs, max_drop=0.005)
        self.manifest = apply_thresholds(self.manifest, thresholds, details)
        write_manifest(self.repository, self.manifest)
        self.log(f"calibrated thresholds (0.5 pt on held-out): {[round(float(t), 4) for t in thresholds]}")
        rows = offline_sweep(self.manifest, heldout, test)
        self._write_json("sweep.json", rows)
        self._write_csv("sweep.csv", rows)
        # A fixed random subset in random order: the split is stored class by class, and a
        # level that sends fewer requests than there are images uses the first ones only.
        chosen = np.random.default_rng(0).permutation(len(test_labels))[: self.plan.images]
        self.test_images = normalise_uint8(test_images[chosen], self.manifest.mean, self.manifest.std)
        self.test_labels = test_labels[chosen]
        return rows

    # -- online --------------------------------------------------------------
    def _levels(self, name: str, target: Target, concurrency=None, rates=()) -> list[dict]:
        results = []
        for level in concurrency or self.plan.concurrency:
            result = asyncio.run(closed_loop(target, self.test_images, self.test_labels, level,
                                             self.plan.requests, self.plan.seconds))
            results.append(result.as_dict())
            self._progress(name, result)
        for rate in rates:
            result = asyncio.run(open_loop(target, self.test_images, self.test_labels, rate,
                                           self.plan.requests, self.plan.seconds))
            results.append(result.as_dict())
            self._progress(name, result)
        self.scenarios[name] = results
        self._write_json(f"scenario_{name}.json", results)
        self._write_csv(f"scenario_{name}.csv", [_flatten(r) for r in results])
        return results

    def _progress(self, name: str, result: LevelResult) -> None:
        latency = result.latency_ms
        self.log(f"  {name:28s} {result.mode} {result.level:>6g}: {result.throughput:7.1f}/s  "
                 f"p50 {latency.get('p50', float('nan')):6.2f} ms  p99 {latency.get('p99', float('nan')):6.2f} ms  "
                 f"acc {(result.accuracy or 0) * 100:5.1f}%  errors {result.errors}")

    def online(self, triton_venv: Path | None) -> None:
        model, logs = self.manifest.model, self.output / "logs"
        logs.mkdir(exist_ok=True)
        headline = (self.plan.headline_concurrency,)
        gateway_args = ("--workers", "2", "--intra-op-threads", "1")
        with GatewayServer(self.repository, *gateway_args, log_path=logs / "gateway_onnxruntime.log") as gateway:
            self.log("embedded ONNX Runtime backend")
            self._levels("full_gateway_onnxruntime", Target("grpc", gateway.grpc_url, model, {"policy": "full"}),
                         rates=self.plan.rates)
            self._levels("early_gateway_onnxruntime", Target("grpc", gateway.grpc_url, model),
                         rates=self.plan.rates)
            self._levels("full_gateway_onnxruntime_http", Target("http", gateway.http_url, model, {"policy": "full"}))
            self._levels("early_gateway_onnxruntime_http", Target("http", gateway.http_url, model))
            for entry in self.manifest.exits:
                self._levels(f"fixed{entry.depth}_gateway_onnxruntime",
                             Target("grpc", gateway.grpc_url, model, {"policy": "fixed", "exit_depth": entry.depth}),
                             headline)
            first = self.scenarios[f"fixed{self.manifest.exits[0].depth}_gateway_onnxruntime"]
            first_p99 = self._at(first, "closed", headline[0])["latency_ms"]["p99"]
            for factor in self.plan.budget_factors:
                budget = round(first_p99 * factor, 2)
                self._levels(f"budget{factor:g}x_gateway_onnxruntime",
                             Target("grpc", gateway.grpc_url, model, {"policy": "budget", "budget_ms": budget},
                                    budget_ms=budget), headline)
            (logs / "gateway_onnxruntime.metrics.txt").write_text(gateway.metrics())
        if triton_venv is None:
            self.log("no Triton virtualenv: skipping the Triton scenarios (make triton)")
            return
        with TritonServer(self.repository, triton_venv, log_path=logs / "tritonserver.log") as triton:
            self.log("Triton (nvidia-pytriton tritonserver, python backend)")
            final = self.manifest.exits[-1]
            self._levels("full_triton_direct", Target("grpc", triton.grpc_url, final.exit_model.name,
                                                      fixed_depth=final.depth))
            triton_args = ("--backend", "triton", "--triton-url", triton.grpc_url, "--workers", "16")
            with GatewayServer(self.repository, *triton_args, log_path=logs / "gateway_triton.log") as gateway:
                self._levels("full_gateway_triton", Target("grpc", gateway.grpc_url, model, {"policy": "full"}))
                self._levels("early_gateway_triton", Target("grpc", gateway.grpc_url, model))
                (logs / "gateway_triton.metrics.txt").write_text(gateway.metrics())

    @staticmethod
    def _at(results: list[dict], mode: str, level: float) -> dict:
        return next(r for r in results if r["mode"] == mode and r["level"] == level)

    # -- summary -------------------------------------------------------------
    def summary(self, sweep: list[dict], command: str) -> dict:
        c = self.plan.headline_concurrency
        final = next(r for r in sweep if r["kind"] == "fixed_exit" and r["target"] == self.manifest.exits[-1].depth)
        early = next(r for r in sweep if r["kind"] == "accuracy_drop" and r["target"] == 0.5)
        oracle_row = next(r for r in sweep if r["kind"] == "oracle")

        def at(name: str) -> dict | None:
            return self._at(self.scenarios[name], "closed", c) if name in self.scenarios else None

        def ratio(a: dict | None, b: dict | None, key) -> float | None:
            if not a or not b:
                return None
            va, vb = key(a), key(b)
            return round(va / vb, 4) if va and vb else None

        throughput = lambda r: r["throughput"]  # noqa: E731
        p99 = lambda r: r["latency_ms"].get("p99")  # noqa: E731
        budgets = sorted(((name, self.scenarios[name][0]) for name in self.scenarios if name.startswith("budget")),
                         key=lambda item: float(item[0][len("budget"):].split("x")[0]))
        answered = [(name, r) for name, r in budgets if r["errors"] == 0 and r["completed"] == r["sent"]]
        return {
            "final_exit_test_acc": final["test_acc"], "early_exit_test_acc": early["test_acc"],
            "acc_drop_pt": round((final["test_acc"] - early["test_acc"]) * 100, 3),
            "mean_macs_fraction": round(early["macs_fraction"], 4),
            "oracle_macs_fraction": round(oracle_row["macs_fraction"], 4),
            "throughput_ratio_c16": ratio(at("early_gateway_onnxruntime"), at("full_gateway_onnxruntime"), throughput),
            "p99_ratio_c16": ratio(at("early_gateway_onnxruntime"), at("full_gateway_onnxruntime"), p99),
            "triton_throughput_ratio": ratio(at("early_gateway_triton"), at("full_triton_direct"), throughput),
            "gateway_overhead_ratio": ratio(at("full_gateway_triton"), at("full_triton_direct"), throughput),
            "budget_attainment": answered[0][1]["within_budget"] if answered else None,
            "budget_attainment_scenario": answered[0][0] if answered else None,
            "headline_concurrency": c,
            "command": command, "commit": git_commit(), "machine": machine_name(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": self.manifest.model, "checkpoint": self.manifest.source.get("checkpoint"),
        }

    def _write_json(self, name: str, data) -> None:
        (self.output / name).write_text(json.dumps(data, indent=2, default=float) + "\n")

    def _write_csv(self, name: str, rows: list[dict]) -> None:
        import csv

        if not rows:
            return
        keys = list(dict.fromkeys(key for row in rows for key in row))
        with open(self.output / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
                             for row in rows)


def _flatten(result: dict) -> dict:
    flat = {k: v for k, v in result.items() if k not in ("latency_ms", "exits", "error_examples")}
    flat.update({f"latency_{k}_ms": v for k, v in result["latency_ms"].items()})
    flat.update({f"exits_{k}": v for k, v in result["exits"].items()})
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--output", type=Path, default=None,
                        help="results directory (default benchmarks/results/<date>-<machine>[-short])")
    parser.add_argument("--full", action="store_true", help="every concurrency level, longer levels")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton scenarios")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the gateways and tritonserver started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = FULL if args.full else SHORT
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    output = args.output or REPO_ROOT / "benchmarks" / "results" / (
        f"{stamp}-{platform.node()}" + ("" if args.full else "-short"))
    output.mkdir(parents=True, exist_ok=True)
    benchmark = Benchmark(args.model_repository, output, plan)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    sweep = benchmark.calibrate_and_sweep()
    triton_venv = None
    if not args.no_triton:
        triton_venv = DEFAULT_VENV if triton_installed(DEFAULT_VENV) else None
    benchmark.online(triton_venv)
    summary = benchmark.summary(sweep, command)
    benchmark._write_json("summary.json", summary)
    write_report(output)
    print(json.dumps(summary, indent=2))
    print(f"results in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
