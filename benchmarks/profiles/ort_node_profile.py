"""Where an ONNX model's time goes, node by node, in ONNX Runtime on one CPU thread.

    taskset -c 0 .venv/bin/python benchmarks/profiles/ort_node_profile.py \
        model_repository/r20_r56_seg0to7/1/model.onnx --batch 13 --runs 300

Runs the model `--runs` times on random inputs of the model's own shape with the gateway's session
options (`common.onnxruntime_session.session_options`, one non-spinning thread) and ONNX Runtime's
profiler on, then prints each node's mean kernel time per run, its share, and its MMAC where the node
is a convolution (from its weight and output shapes), so that the rate per convolution shows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime

from common.onnxruntime_session import session_options


def conv_macs(model: onnx.ModelProto, batch: int) -> dict[str, float]:
    """Output name -> MACs per run of each Conv node (weights x output pixels)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or batch for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights and node.output[0] in shapes:
            out = shapes[node.output[0]]
            macs[node.output[0]] = float(np.prod(weights[node.input[1]])) * out[0] * out[2] * out[3]
    return macs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx file with one FP32 input")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    model = onnx.load(args.model)
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    inputs = {spec.name: np.random.default_rng(0).random((args.batch, *spec.shape[1:]), dtype=np.float32)}
    for _ in range(args.runs):
        session.run(None, inputs)
    with open(session.end_profiling()) as profile:
        events = json.load(profile)
    times, ops = Counter(), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            times[name] += event["dur"]
            ops[name] = event["args"].get("op_name", "?")
    runs = [event["dur"] for event in events if event.get("name") == "model_run"]
    total = sum(times.values())
    macs = conv_macs(model, args.batch)
    print(f"{args.model}, batch {args.batch}, {args.runs} runs: kernels {total / args.runs:.0f} us a run, "
          f"model_run median {np.median(runs):.0f} us")
    for name, spent in times.most_common(args.top):
        per_run = spent / args.runs
        node_macs = next((m for out, m in macs.items() if name.startswith(out)), None)
        rate = f"  {node_macs / 1e6:7.2f} MMAC, {node_macs / per_run / 1e3:5.1f} GMAC/s" if node_macs else ""
        print(f"{per_run:9.1f} us {100 * spent / total:5.1f}%  {ops[name]:<14} {name}{rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
