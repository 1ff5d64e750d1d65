"""Measure every exported model's latency per batch size and write it into the manifest.

    python -m export.profile --model-repository model_repository

Runs each per-exit and per-segment ONNX model with ONNX Runtime on this machine
(CPU provider, or CUDA where present) and stores the median milliseconds per
batch size under `latency_ms` of each exit, with the machine and settings under
`profile`. The gateway's latency-budget policy reads these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError, run_cli
from common.manifest import DeployedModel, ManifestError, manifest_path, read_manifest, write_manifest
from common.onnxruntime_session import create_session, execution_providers
from common.provenance import machine_description, utc_timestamp

DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64"


def measure(session, input_shape: list[int], batch: int, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `repeats` runs at `batch` (after `warmup` runs)."""
    name = session.get_inputs()[0].name
    data = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {name: data})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: data})
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 4)


def profile_repository(repository: Path, batch_sizes: list[int], threads: int, repeats: int,
                       show_progress: bool = True, model: str | None = None) -> dict:
    """Profile `model` (default: the repository's first) and write its manifest."""
    import onnxruntime as ort

    try:
        manifest = read_manifest(repository, model)
    except ManifestError as error:
        raise UserError(str(error)) from None
    provider = execution_providers("auto")[0]
    jobs: list[tuple[int, str, DeployedModel]] = []
    for position, entry in enumerate(manifest.exits):
        jobs.append((position, "segment_model", entry.segment_model))
        if entry.exit_model is not None:
            jobs.append((position, "exit_model", entry.exit_model))
    latencies: list[dict] = [{} for _ in manifest.exits]
    bar = tqdm(total=len(jobs) * len(batch_sizes), desc="profiling", disable=not show_progress)
    for position, kind, deployed in jobs:
        path = repository / deployed.name / str(deployed.version) / "model.onnx"
        if not path.exists():
            raise UserError(f"{path} not found: profiling needs the ONNX files (TensorRT-only repositories "
                            "are not profiled yet)")
        session = create_session(path, threads, device="auto")
        per_batch = {}
        for batch in batch_sizes:
            if batch > manifest.max_batch_size:
                continue
            per_batch[str(batch)] = measure(session, deployed.inputs[0].shape, batch, repeats)
            bar.update(1)
        latencies[position][kind] = per_batch
    bar.close()
    exits = [replace(entry, latency_ms=latency) for entry, latency in zip(manifest.exits, latencies)]
    profile = {
        "runtime": f"onnxruntime {ort.__version__}", "provider": provider, "intra_op_threads": threads,
        "repeats": repeats, "machine": machine_description(),
        "date": utc_timestamp(),
        "command": "python -m export.profile " + " ".join(sys.argv[1:]),
    }
    write_manifest(repository, manifest.with_exits(exits, profile=profile))
    return {"profile": profile, "latency_ms": latencies, "manifest": manifest_path(repository, manifest.model)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default=None,
                        help="which model of the repository (default: its first, the one in manifest.json)")
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, help=f"default {DEFAULT_BATCH_SIZES}")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per session, as the gateway runs them (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (median kept)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not batch_sizes or batch_sizes[0] < 1 or args.threads < 1 or args.repeats < 1:
        raise UserError("--batch-sizes, --threads and --repeats must be positive")
    result = profile_repository(args.model_repository, batch_sizes, args.threads, args.repeats,
                                not args.no_progress, args.model)
    for position, latency in enumerate(result["latency_ms"]):
        seg = latency["segment_model"]
        print(f"exit {position + 1}: segment ms " + ", ".join(f"b{b}={ms:.2f}" for b, ms in seg.items()))
    print(f"wrote latencies into {result['manifest']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
