"""Where an ONNX model's time goes, node by node, in ONNX Runtime on one CPU thread.

    taskset -c 0 .venv/bin/python benchmarks/profiles/ort_node_profile.py \
        model_repository/r20_r56_seg0to7/1/model.onnx --batch 13 --runs 300

Runs the model `--runs` times on random inputs of the model's own shape with the gateway's session
options (`common.onnxruntime_session.session_options`, one non-spinning thread) and ONNX Runtime's
profiler on, then prints each node's mean kernel time per run, its share, and its MMAC where the node
is a convolution (from its weight and output shapes), so that the rate per convolution shows.

`--int8` quantises the model first (ONNX Runtime's static QDQ quantisation, int8 weights per channel,
uint8 activations, calibrated on random inputs: a measure of speed only, not of accuracy) and profiles
that copy, after a line with the float model's median run time at the same batch.
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


def quantise_int8(source: str, output: str, batch: int) -> None:
    """A static QDQ int8 copy of `source` (calibrated on 8 random batches: for timing only)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = output + ".pre.onnx"
    quant_pre_process(source, prepared)
    spec = onnxruntime.InferenceSession(prepared, providers=["CPUExecutionProvider"]).get_inputs()[0]
    rng = np.random.default_rng(0)
    batches = iter([{spec.name: rng.standard_normal((batch, *spec.shape[1:])).astype(np.float32)} for _ in range(8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantize_static(prepared, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def profile(path: str, batch: int, runs: int) -> list[dict]:
    """ONNX Runtime's profile events of `runs` runs on random inputs."""
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    inputs = {spec.name: np.random.default_rng(0).random((batch, *spec.shape[1:]), dtype=np.float32)}
    for _ in range(runs):
        session.run(None, inputs)
    with open(session.end_profiling()) as file:
        return json.load(file)


def median_run_us(events: list[dict]) -> float:
    return float(np.median([event["dur"] for event in events if event.get("name") == "model_run"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx file with one FP32 input")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--int8", action="store_true", help="profile a static int8 (QDQ) copy of the model")
    args = parser.parse_args(argv)
    path = args.model
    if args.int8:
        float_events = profile(args.model, args.batch, args.runs)
        print(f"{args.model} (float), batch {args.batch}, {args.runs} runs: model_run median "
              f"{median_run_us(float_events):.0f} us")
        path = os.path.join(tempfile.mkdtemp(), "int8.onnx")
        quantise_int8(args.model, path, args.batch)
    model = onnx.load(args.model)
    events = profile(path, args.batch, args.runs)
    times, ops = Counter(), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            times[name] += event["dur"]
            ops[name] = event["args"].get("op_name", "?")
    total = sum(times.values())
    macs = conv_macs(model, args.batch)
    label = f"{args.model} (int8)" if args.int8 else args.model
    print(f"{label}, batch {args.batch}, {args.runs} runs: kernels {total / args.runs:.0f} us a run, "
          f"model_run median {median_run_us(events):.0f} us")
    for name, spent in times.most_common(args.top):
        per_run = spent / args.runs
        node_macs = next((m for out, m in macs.items() if name.startswith(out)), None)
        rate = f"  {node_macs / 1e6:7.2f} MMAC, {node_macs / per_run / 1e3:5.1f} GMAC/s" if node_macs else ""
        print(f"{per_run:9.1f} us {100 * spent / total:5.1f}%  {ops[name]:<14} {name}{rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
