"""The latency-accuracy benchmark: what early exit buys over serving the full network,
side by side in one run on this machine.

    python -m benchmarks.run            # short: a few minutes (make bench)
    python -m benchmarks.run --full     # all concurrency levels, longer levels
    python -m benchmarks.run --no-pin   # servers and load generator share every core

Steps, each a function with its inputs and outputs: `offline` calibrates thresholds
on the held-out split and sweeps targets on the test split (with fixed exits and the
oracle); `online` loads real test images over gRPC and HTTP, closed loop over
concurrency levels and open loop at Poisson rates, against servers on a temporary
copy of the repository that holds the calibrated thresholds (the repository itself
is not modified; `python -m benchmarks.calibrate` writes thresholds into it): the
full network through the gateway, the full network called directly on Triton, early
exit on the embedded ONNX Runtime backend (one image and 8 images a request) and on
the Triton backend, the `<model>_cascade` Triton model directly and through the
gateway (`--backend triton-cascade`) where the repository has it, each fixed exit,
and the latency-budget policy at several budgets; `summarize` computes the headline.
Every level records the CPU time per request of each server process and of the load
generator, and the gateway's CPU inside backend calls (benchmarks/cpu.py); with two
or more cores the servers and the load generator run on disjoint cores. Writes
benchmarks/results/<date>-<machine>/ with CSV/JSON per scenario, calibration.json,
plots, a REPORT.md and a summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.calibrate import apply_thresholds, calibrate
from benchmarks.cpu import CoreSplit, CpuMeter, Servers, pin_process_tree, pinned_self, split_cores
from benchmarks.exit_outputs import compute_exit_outputs, load_images
from benchmarks.loadgen import LevelResult, Target, closed_loop, open_loop
from benchmarks.report import write_report
from benchmarks.servers import GatewayServer
from benchmarks.serving_cost import closed_level, ratio, serving_cost
from benchmarks.sweep import offline_sweep
from benchmarks.triton_launcher import DEFAULT_VENV, TritonServer, triton_installed
from common.errors import UserError, run_cli
from common.manifest import Manifest, ManifestError, read_manifest, write_manifest
from common.paths import REPO_ROOT
from common.provenance import git_commit, utc_timestamp
from common.provenance import machine_description as machine_name
from common.triton_cascade import NORMALISED_INPUT, cascade_model_name
from serving.preprocess import normalise_uint8

CALIBRATION_DROP_PT = 0.5  # the accuracy-drop target (held-out, in points) of the early-exit scenarios


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
    request_batch: int = 8  # images per request of the batched-client scenarios

    @property
    def queue_images(self) -> int:
        """The gateways' admission bound in these runs (`--max-queue-images`): every image a closed
        loop can have in flight (the highest concurrency with the batched requests' size), so that
        no scenario measures refusals. The default bound (`--max-queue-ms` of work at the profiled
        speed) can fall below that: 65 images from a profile taken on a busy machine refused 99%
        of the 8-image requests at c=16 in an earlier run."""
        return max(self.concurrency) * self.request_batch


SHORT = Plan((1, 4, 16), 16, 600, 8.0, (50.0, 150.0), (1.0, 1.5, 2.0, 3.0), 2000)
FULL = Plan((1, 2, 4, 8, 16, 32), 16, 4000, 30.0, (50.0, 100.0, 200.0), (1.0, 1.25, 1.5, 2.0, 3.0), 10000)


@dataclass(frozen=True)
class Workload:
    """The requests every online scenario sends, and for how long."""

    images: np.ndarray  # normalised test images, in a fixed random order
    labels: np.ndarray
    plan: Plan


@dataclass(frozen=True)
class Offline:
    """What the offline step hands to the online one."""

    manifest: Manifest  # the repository's, with thresholds calibrated on the held-out split
    sweep: list[dict]
    workload: Workload


# -- offline -----------------------------------------------------------------
def offline(repository: Path, manifest: Manifest, plan: Plan, log=print) -> Offline:
    """Calibrate thresholds on held-out, sweep targets on test, and pick the test images to send."""
    log("computing every exit's outputs on the held-out and test splits")
    heldout = compute_exit_outputs(repository, manifest, *load_images(manifest, "heldout"))
    test_images, test_labels = load_images(manifest, "test")
    test = compute_exit_outputs(repository, manifest, test_images, test_labels)
    macs = [entry.macs for entry in manifest.exits]
    thresholds, details = calibrate(heldout, macs, max_drop=CALIBRATION_DROP_PT / 100, full_macs=manifest.full_macs)
    calibrated = apply_thresholds(manifest, thresholds, details, command="python -m benchmarks.run (calibration)")
    log(f"calibrated thresholds ({CALIBRATION_DROP_PT:g} pt on held-out): "
        f"{[round(float(t), 4) for t in thresholds]}")
    sweep = offline_sweep(calibrated, heldout, test)
    # A fixed random subset in random order: the split is stored class by class, and a
    # level that sends fewer requests than there are images uses the first ones only.
    chosen = np.random.default_rng(0).permutation(len(test_labels))[: plan.images]
    images = normalise_uint8(test_images[chosen], manifest.mean, manifest.std)
    return Offline(calibrated, sweep, Workload(images, test_labels[chosen], plan))


@contextlib.contextmanager
def served_repository(repository: Path, manifest: Manifest):
    """A temporary copy of `repository` (hard links where possible) holding `manifest`: the
    servers read the calibrated thresholds there, and the input repository stays as it was."""
    with tempfile.TemporaryDirectory(prefix="early-exit-benchmark-") as directory:
        served = Path(directory) / Path(repository).name
        shutil.copytree(repository, served, copy_function=_link_or_copy, symlinks=True)
        write_manifest(served, manifest)  # replaced by rename: the original's hard link is untouched
        yield served


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system
        shutil.copy2(source, destination)


# -- online ------------------------------------------------------------------
@dataclass(frozen=True)
class Online:
    """What the online step measured: {scenario name: level results}, and the scenarios it could not run."""

    scenarios: dict[str, list[dict]]
    skipped: dict[str, str]  # scenario name -> why
    pinning: CoreSplit | None


def run_scenario(name: str, target: Target, workload: Workload, output: Path, servers: Servers, log=print,
                 concurrency: tuple[int, ...] | None = None, rates: tuple[float, ...] = ()) -> list[dict]:
    """Closed loop at each concurrency level, then open loop at each rate, with the CPU of `servers` and
    of the load generator over each level's measured window; writes scenario_<name>.*."""
    plan, results = workload.plan, []
    for level in concurrency or plan.concurrency:
        result = asyncio.run(closed_loop(target, workload.images, workload.labels, level, plan.requests,
                                         plan.seconds, meter=CpuMeter(servers)))
        results.append(result.as_dict())
        _progress(name, result, log)
    for rate in rates:
        result = asyncio.run(open_loop(target, workload.images, workload.labels, rate, plan.requests, plan.seconds,
                                       meter=CpuMeter(servers)))
        results.append(result.as_dict())
        _progress(name, result, log)
    write_json(output / f"scenario_{name}.json", results)
    write_csv(output / f"scenario_{name}.csv", [_flatten(r) for r in results])
    return results


def _progress(name: str, result: LevelResult, log) -> None:
    latency = result.latency_ms
    cpu = (result.cpu or {}).get("ms_per_request", {})
    log(f"  {name:32s} {result.mode} {result.level:>6g}: {result.throughput:7.1f}/s  "
        f"p50 {latency.get('p50', float('nan')):6.2f} ms  p99 {latency.get('p99', float('nan')):6.2f} ms  "
        f"acc {(result.accuracy or 0) * 100:5.1f}%  errors {result.errors}  CPU ms/request "
        + " ".join(f"{role} {value:.2f}" for role, value in cpu.items() if value is not None))


def cascade_model(repository: Path, manifest: Manifest) -> str | None:
    """`<model>_cascade` where the repository holds it (the Triton model that runs the whole cascade)."""
    name = cascade_model_name(manifest.model)
    return name if (Path(repository) / name / "config.pbtxt").exists() else None


@dataclass
class _Session:
    """The online step's shared state: where results go, the cores, and what was measured or skipped."""

    workload: Workload
    output: Path
    pinning: CoreSplit | None
    log: object = print
    scenarios: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def scenario(self, name: str, target: Target, servers: Servers, concurrency=None, rates=()) -> None:
        self.scenarios[name] = run_scenario(name, target, self.workload, self.output, servers, self.log,
                                            concurrency, rates)

    def pin(self, process) -> None:
        """A server process (and its children) onto the servers' cores, once it is ready."""
        if self.pinning is not None:
            pin_process_tree(process.pid, self.pinning.servers)

    def gateway(self, repository: Path, name: str, *args: str) -> GatewayServer:
        gateway = GatewayServer(repository, *args, log_path=self.output / "logs" / f"gateway_{name}.log")
        self.pin(gateway.process)
        return gateway


def online(repository: Path, manifest: Manifest, workload: Workload, output: Path, triton_venv: Path | None,
           pinning: CoreSplit | None, log=print) -> Online:
    """Every online scenario against servers on `repository`, the servers on `pinning.servers` and the
    load generator on `pinning.loadgen` (no pinning for None)."""
    session = _Session(workload, output, pinning, log)
    (output / "logs").mkdir(exist_ok=True)
    with pinned_self(pinning.loadgen if pinning else None):
        _embedded_scenarios(session, repository, manifest)
        if triton_venv is None:
            log("no Triton virtualenv: skipping the Triton scenarios (make triton)")
            session.skipped.update(dict.fromkeys(TRITON_SCENARIOS, "no Triton virtualenv (make triton)"))
        else:
            _triton_scenarios(session, repository, manifest, triton_venv)
    return Online(session.scenarios, session.skipped, pinning)


def _embedded_scenarios(session: _Session, repository: Path, manifest: Manifest) -> None:
    """The gateway on its embedded ONNX Runtime backend: full network, early exit (one image and
    `request_batch` images a request), over HTTP too, each fixed exit, and the budget policy."""
    model, plan, scenario = manifest.model, session.workload.plan, session.scenario
    headline, batch = (plan.headline_concurrency,), plan.request_batch
    full, early = {"policy": "full"}, {}
    with session.gateway(repository, "onnxruntime", "--workers", "2", "--intra-op-threads", "1",
                         "--max-queue-images", str(plan.queue_images)) as gateway:
        servers = Servers(gateway.process.pid, gateway.metrics_url)
        session.log("embedded ONNX Runtime backend")
        grpc = gateway.grpc_url
        scenario("full_gateway_onnxruntime", Target("grpc", grpc, model, full), servers, rates=plan.rates)
        scenario("early_gateway_onnxruntime", Target("grpc", grpc, model, early), servers, rates=plan.rates)
        for name, policy in (("full", full), ("early", early)):
            scenario(f"{name}_gateway_onnxruntime_batch{batch}", Target("grpc", grpc, model, policy, batch=batch),
                     servers, headline)
        scenario("full_gateway_onnxruntime_http", Target("http", gateway.http_url, model, full), servers)
        scenario("early_gateway_onnxruntime_http", Target("http", gateway.http_url, model, early), servers)
        for entry in manifest.exits:
            scenario(f"fixed{entry.depth}_gateway_onnxruntime",
                     Target("grpc", grpc, model, {"policy": "fixed", "exit_depth": entry.depth}), servers, headline)
        first_p99 = closed_level(session.scenarios, f"fixed{manifest.exits[0].depth}_gateway_onnxruntime",
                                 headline[0])["latency_ms"]["p99"]
        for factor in plan.budget_factors:
            budget = round(first_p99 * factor, 2)
            scenario(f"budget{factor:g}x_gateway_onnxruntime",
                     Target("grpc", grpc, model, {"policy": "budget", "budget_ms": budget}, budget_ms=budget),
                     servers, headline)
        (session.output / "logs" / "gateway_onnxruntime.metrics.txt").write_text(gateway.metrics())


TRITON_SCENARIOS = ("full_triton_direct", "full_gateway_triton", "early_gateway_triton",
                    "early_triton_cascade_direct", "early_gateway_triton_cascade")


def _triton_scenarios(session: _Session, repository: Path, manifest: Manifest, triton_venv: Path) -> None:
    """The full network called directly on Triton and through the gateway's Triton backend, early exit
    through that backend, and the `<model>_cascade` Triton model called directly and through the gateway
    (`--backend triton-cascade`) at concurrency 1 and the headline level."""
    model, cascade, logs = manifest.model, cascade_model(repository, manifest), session.output / "logs"
    cascade_levels = tuple(sorted({1, session.workload.plan.headline_concurrency}))
    with TritonServer(repository, triton_venv, log_path=logs / "tritonserver.log") as triton:
        session.pin(triton.process)
        session.log("Triton (nvidia-pytriton tritonserver, python backend)")
        direct, final = Servers(triton_pid=triton.process.pid), manifest.exits[-1]
        session.scenario("full_triton_direct",
                         Target("grpc", triton.grpc_url, final.exit_model.name, fixed_depth=final.depth), direct)
        if cascade is None:
            why = f"no {model}_cascade model in the repository"
            session.skipped.update({"early_triton_cascade_direct": why, "early_gateway_triton_cascade": why})
        else:
            session.scenario("early_triton_cascade_direct",
                             Target("grpc", triton.grpc_url, cascade, input_name=NORMALISED_INPUT), direct,
                             cascade_levels)
        plans = [("triton", ("full_gateway_triton", "early_gateway_triton"), None)]
        if cascade is not None:
            plans.append(("triton-cascade", ("early_gateway_triton_cascade",), cascade_levels))
        for backend, names, levels in plans:
            try:
                gateway = session.gateway(repository, backend, "--backend", backend, "--triton-url", triton.grpc_url,
                                          "--workers", "16", "--max-queue-images",
                                          str(session.workload.plan.queue_images))
            except RuntimeError as error:  # a gateway without this backend
                session.skipped.update(dict.fromkeys(
                    names, f"the gateway did not start with --backend {backend}: {str(error)[-300:]}"))
                continue
            with gateway:
                servers = Servers(gateway.process.pid, gateway.metrics_url, triton.process.pid)
                for name in names:
                    policy = {"policy": "full"} if name.startswith("full") else {}
                    session.scenario(name, Target("grpc", gateway.grpc_url, model, policy), servers, levels)
                (logs / f"gateway_{backend}.metrics.txt").write_text(gateway.metrics())


# -- summary -----------------------------------------------------------------
def summarize(manifest: Manifest, sweep: list[dict], measured: Online, plan: Plan, command: str) -> dict:
    """summary.json: the headline numbers (ratios at the headline concurrency) and how they were made."""
    c, scenarios = plan.headline_concurrency, measured.scenarios
    final = next(r for r in sweep if r["kind"] == "fixed_exit" and r["target"] == manifest.exits[-1].depth)
    early = next(r for r in sweep if r["kind"] == "accuracy_drop" and r["target"] == CALIBRATION_DROP_PT)
    oracle_row = next(r for r in sweep if r["kind"] == "oracle")

    def compare(a: str, b: str, key) -> float | None:
        level_a, level_b = closed_level(scenarios, a, c), closed_level(scenarios, b, c)
        return ratio(key(level_a), key(level_b)) if level_a and level_b else None

    throughput = lambda r: r["throughput"]  # noqa: E731
    p99 = lambda r: r["latency_ms"].get("p99")  # noqa: E731
    budgets = sorted(((name, scenarios[name][0]) for name in scenarios if name.startswith("budget")),
                     key=lambda item: float(item[0][len("budget"):].split("x")[0]))
    answered = [(name, r) for name, r in budgets if r["errors"] == 0 and r["completed"] == r["sent"]]
    mean_macs_fraction = round(early["macs_fraction"], 4)
    return {
        "final_exit_test_acc": final["test_acc"], "early_exit_test_acc": early["test_acc"],
        "acc_drop_pt": round((final["test_acc"] - early["test_acc"]) * 100, 3),
        "mean_macs_fraction": mean_macs_fraction,
        "oracle_macs_fraction": round(oracle_row["macs_fraction"], 4),
        # Of the saving an oracle would take (each sample at its first correct exit), the share taken.
        "saving_over_oracle": round((1 - early["macs_fraction"]) / (1 - oracle_row["macs_fraction"]), 4)
        if oracle_row["macs_fraction"] < 1 else None,
        f"throughput_ratio_c{c}": compare("early_gateway_onnxruntime", "full_gateway_onnxruntime", throughput),
        f"p99_ratio_c{c}": compare("early_gateway_onnxruntime", "full_gateway_onnxruntime", p99),
        "gateway_overhead_ratio": compare("full_gateway_triton", "full_triton_direct", throughput),
        **serving_cost(scenarios, c, mean_macs_fraction, plan.request_batch),
        "budget_attainment": answered[0][1]["within_budget"] if answered else None,
        "budget_attainment_scenario": answered[0][0] if answered else None,
        "headline_concurrency": c,
        "cpu_pinning": measured.pinning.as_dict() if measured.pinning else None,
        "skipped_scenarios": measured.skipped,
        "command": command, "commit": git_commit(), "machine": machine_name(),
        "date": utc_timestamp(),
        "model": manifest.model, "checkpoint": manifest.source.get("checkpoint"),
    }


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
                         for row in rows)


def _flatten(result: dict) -> dict:
    flat = {k: v for k, v in result.items() if k not in ("latency_ms", "exits", "error_examples", "cpu")}
    flat.update({f"latency_{k}_ms": v for k, v in result["latency_ms"].items()})
    per_request = (result.get("cpu") or {}).get("ms_per_request") or {}
    flat.update({f"cpu_{role}_ms_per_request": value for role, value in per_request.items()})
    flat.update({f"exits_{k}": v for k, v in result["exits"].items()})
    return flat


# -- the whole run -----------------------------------------------------------
def run_benchmark(repository: Path, output: Path, plan: Plan, triton_venv: Path | None, command: str,
                  log=print, pin: bool = True, compare_with: Path | None = None) -> dict:
    """Offline, then online on a calibrated copy of `repository`; writes every file into `output`. With
    `pin` (and at least two cores) the servers and the load generator run on disjoint cores."""
    try:
        manifest = read_manifest(repository)
    except ManifestError as error:
        raise UserError(str(error)) from None
    output.mkdir(parents=True, exist_ok=True)
    result = offline(repository, manifest, plan, log)
    write_json(output / "sweep.json", result.sweep)
    write_csv(output / "sweep.csv", result.sweep)
    calibrated = result.manifest
    write_json(output / "calibration.json", {"exit_depths": calibrated.exit_depths,
                                             "thresholds": [entry.threshold for entry in calibrated.exits],
                                             **calibrated.calibration})
    with served_repository(repository, calibrated) as served:
        pinning = split_cores() if pin else None
        if pinning:
            log(f"servers on cores {list(pinning.servers)}, the load generator on {list(pinning.loadgen)}")
        measured = online(served, calibrated, result.workload, output, triton_venv, pinning, log)
    summary = summarize(calibrated, result.sweep, measured, plan, command)
    if compare_with is not None:
        summary["compared_with"] = str(Path(os.path.relpath(compare_with.resolve(), output.resolve())))
    write_json(output / "summary.json", summary)
    write_report(output)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--output", type=Path, default=None,
                        help="results directory (default benchmarks/results/<date>-<machine>[-short])")
    parser.add_argument("--full", action="store_true", help="every concurrency level, longer levels")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton scenarios")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="RESULTS_DIR",
                        help="an earlier run whose offline sweep the accuracy-vs-MACs plot shows beside this one")
    parser.add_argument("--no-pin", action="store_true",
                        help="let servers and load generator share every core (default: disjoint cores)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the gateways and tritonserver started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = FULL if args.full else SHORT
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    output = args.output or REPO_ROOT / "benchmarks" / "results" / (
        f"{stamp}-{platform.node()}" + ("" if args.full else "-short"))
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    triton_venv = DEFAULT_VENV if not args.no_triton and triton_installed(DEFAULT_VENV) else None
    if args.compare_with is not None and not (args.compare_with / "sweep.json").exists():
        raise UserError(f"--compare-with {args.compare_with}: no sweep.json there")
    summary = run_benchmark(args.model_repository, output, plan, triton_venv, command, pin=not args.no_pin,
                            compare_with=args.compare_with)
    print(json.dumps(summary, indent=2))
    print(f"results in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
