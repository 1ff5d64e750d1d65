"""The robustness run as a whole: the phases, their durations (the issue's, or seconds each with
--quick), the workload, and `run`, which runs the chosen phases against one `Run` and writes
robustness.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.cpu import split_cores
from benchmarks.robustness.faults import FaultPhases
from benchmarks.robustness.hostile import HostileInputPhases
from benchmarks.robustness.load import LoadPhases
from common.errors import UserError
from common.manifest import ManifestError, read_manifest
from common.provenance import git_commit, machine_description, utc_timestamp

PHASES = ("capacity", "overload", "cancellation", "shutdown", "triton", "budget", "soak", "bomb", "fuzz")
ISSUE_DURATIONS = {"capacity_s": 15.0, "overload_s": 60.0, "settle_s": 10.0, "backlog_s": 15.0, "grace_s": 5.0,
                   "budget_s": 20.0, "soak_s": 600.0, "cancel_calls": 200, "fuzz_requests": 50_000}
QUICK_DURATIONS = {"capacity_s": 2.0, "overload_s": 2.0, "settle_s": 1.0, "backlog_s": 2.0, "grace_s": 0.5,
                   "budget_s": 2.0, "soak_s": 4.0, "cancel_calls": 40, "fuzz_requests": 300}


class Run(LoadPhases, FaultPhases, HostileInputPhases):
    """One robustness run: every phase is a method (named as in PHASES) that returns its figures and adds
    its targets to `targets`."""


def load_workload(repository: Path, data: Path | None, count: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Normalised test images and labels (random images without labels when the data is not there)."""
    from serving.preprocess import normalise_uint8

    manifest = read_manifest(repository)
    try:
        from benchmarks.exit_outputs import load_images

        images, labels = load_images(manifest, "test", data=data)
        chosen = np.random.default_rng(0).permutation(len(labels))[:count]
        return normalise_uint8(images[chosen], manifest.mean, manifest.std), np.asarray(labels)[chosen], "test"
    except Exception as error:  # no dataset here: random images, no accuracy
        print(f"no test images ({error}); random images, no accuracy figures")
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, size=(count, *manifest.input.shape[1:], manifest.input.shape[0]), dtype=np.uint8)
        return normalise_uint8(raw, manifest.mean, manifest.std), None, "random"


def run(repository: Path, output: Path, phases: list[str], durations: dict, data: Path | None = None,
        images: int = 2000, command: str = "", log=print, pin: bool = True,
        gateway_args: tuple[str, ...] = (), front_proxy_limit: int | str | None = None,
        front_proxy_template: Path | None = None) -> dict:
    try:
        manifest = read_manifest(repository)
    except ManifestError as error:
        raise UserError(str(error)) from None
    output.mkdir(parents=True, exist_ok=True)
    pixels, labels, source = load_workload(repository, data, images)
    pinning = split_cores() if pin else None
    if pinning:
        log(f"capacity and overload: the gateway on cores {list(pinning.servers)}, "
            f"the load generator on {list(pinning.loadgen)}")
    if front_proxy_limit is not None:
        log(f"capacity and overload through nginx, at most {front_proxy_limit} calls in flight")
    session = Run(repository, output, durations, pixels, labels, manifest.model, log, pinning, gateway_args,
                  front_proxy_limit, front_proxy_template)
    for phase in phases:
        log(f"phase {phase}")
        started = time.monotonic()
        try:
            session.results[phase] = getattr(session, phase)()
        except Exception as error:  # one failing phase is recorded, the others still run
            session.results[phase] = {"error": f"{type(error).__name__}: {error}"[:500]}
        session.results[phase]["phase_wall_s"] = round(time.monotonic() - started, 2)
        log(json.dumps({phase: session.results[phase]}, default=str)[:2000])
    document = {"command": command, "commit": git_commit(), "machine": machine_description(),
                "date": utc_timestamp(), "cpus": os.cpu_count(),
                "cpu_pinning": {"phases": ["capacity", "overload"], **pinning.as_dict()} if pinning else None,
                "model": manifest.model, "images": source, "gateway_args": list(gateway_args),
                "front_proxy": None if front_proxy_limit is None else {
                    "server": "nginx",
                    "template": str(front_proxy_template or "deploy/nginx/templates/default.conf.template"),
                    "max_in_flight": front_proxy_limit, "limits_used": session.front_proxy_limits,
                    "phases": ["capacity", "overload"]},
                "durations": durations, "phases": session.results,
                "targets": {entry.pop("name"): entry for entry in session.targets}}
    (output / "robustness.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    return document
