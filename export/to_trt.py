"""Build TensorRT engines (TensorRT 10 or 11) for chosen exits into a Triton model repository.

    python export/to_trt.py --exits 15,25,56 --precision fp16 --opt-batch 16 --max-batch-size 64

Needs TensorRT and a CUDA device; without them it stops before writing anything. Build
on the GPU model and TensorRT release that serve the plans: a plan runs only there.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

# Run as a script: the repository root replaces this directory on the path, whose
# profile.py would otherwise shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from common.errors import run_cli  # noqa: E402
from export.pipeline import add_export_arguments, export_checkpoint, options_from_args  # noqa: E402
from export.tensorrt_build import DEFAULT_TIMING_CACHE, EngineSettings, TensorRTPlanBuilder  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python export/to_trt.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, backends=("tensorrt",), default_backend="tensorrt")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp16",
                        help="fp16 where the GPU and TensorRT 10 support it (default), else fp32 (TensorRT 11 "
                             "takes precision from the FP32 ONNX graph)")
    parser.add_argument("--min-batch", type=int, default=1, help="optimisation profile minimum batch")
    parser.add_argument("--opt-batch", type=int, default=16, help="optimisation profile optimum batch")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit")
    parser.add_argument("--timing-cache", type=Path, default=DEFAULT_TIMING_CACHE, help="reused across builds")
    args = parser.parse_args(argv)
    settings = EngineSettings(args.min_batch, args.opt_batch, args.max_batch_size, args.precision,
                              args.workspace_mb, args.timing_cache)
    builder = TensorRTPlanBuilder(settings)  # fails here, before any export, without TensorRT or CUDA
    options = replace(options_from_args(args), backend="tensorrt")
    export_checkpoint(options, plan_builder=builder)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
