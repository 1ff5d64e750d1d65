"""Segment CPU per image when each segment runs again and again (its weights stay in the core's
caches) and when the segments run one after the other as the cascade runs them, and the full
network's per-exit model, all on one thread with the project's ONNX Runtime sessions.

    .venv/bin/python benchmarks/profiles/segment_cache.py --repository model_repository --sizes 4,3,2,2

`--sizes`: the batch of each segment but the last (the mean stage batches of early exit under
c=16 load are about 4, 4.5, 3.2 and 3 on the reference model). Prints one JSON line per round:
thread CPU ms per image of each segment, repeated and cycled, and of the full network at
`--full-batch`. It tells what the model costs when staged, apart from the gateway.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.manifest import IMAGE_INPUT, LOGITS_OUTPUT, read_manifest
from common.onnxruntime_session import create_session


def model_path(repository: Path, model) -> Path:
    return repository / model.name / str(model.version) / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--sizes", default="4,3,2,2", help="batch of each segment but the last")
    parser.add_argument("--full-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    manifest = read_manifest(args.repository)
    entries = manifest.exits[:-1]
    sizes = [int(size) for size in args.sizes.split(",")][:len(entries)]
    sessions = [create_session(model_path(args.repository, entry.segment_model)) for entry in entries]
    outputs = [[output.name for output in session.get_outputs()] for session in sessions]
    names = [session.get_inputs()[0].name for session in sessions]
    full = create_session(model_path(args.repository, manifest.exits[-1].exit_model))
    images = np.random.default_rng(0).standard_normal((max(sizes + [args.full_batch]), *manifest.input.shape))
    images = images.astype(np.float32)
    inputs, activations = [], images
    for k, session in enumerate(sessions):  # each segment's input: the previous segment's activations
        inputs.append(np.ascontiguousarray(activations[:sizes[k]]))
        activations = session.run(outputs[k], {names[k]: inputs[k]})[1]
    for _ in range(args.rounds):
        repeated = []
        for k, session in enumerate(sessions):
            started = time.thread_time()
            for _ in range(args.repeats):
                session.run(outputs[k], {names[k]: inputs[k]})
            repeated.append((time.thread_time() - started) / args.repeats / sizes[k] * 1000)
        cycled = [0.0] * len(sessions)
        for _ in range(args.repeats):
            for k, session in enumerate(sessions):
                started = time.thread_time()
                session.run(outputs[k], {names[k]: inputs[k]})
                cycled[k] += time.thread_time() - started
        cycled = [seconds / args.repeats / sizes[k] * 1000 for k, seconds in enumerate(cycled)]
        started = time.thread_time()
        for _ in range(args.repeats // 2):
            full.run([LOGITS_OUTPUT], {IMAGE_INPUT: images[:args.full_batch]})
        full_ms = (time.thread_time() - started) / (args.repeats // 2) / args.full_batch * 1000
        print(json.dumps({"sizes": sizes, "repeated_ms_per_image": [round(v, 3) for v in repeated],
                          "cycled_ms_per_image": [round(v, 3) for v in cycled],
                          f"full_ms_per_image_b{args.full_batch}": round(full_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
