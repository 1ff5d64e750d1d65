"""Export a multi-exit checkpoint to validated ONNX models in a Triton model repository.

    python export/to_onnx.py --exits 15,25,56
    python export/to_onnx.py --checkpoint PATH --exits 15,25,56 --output model_repository/ --backend onnxruntime
"""

import argparse
import sys
from pathlib import Path

# Run as a script: the repository root replaces this directory on the path, whose
# profile.py would otherwise shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from common.errors import run_cli  # noqa: E402
from export.pipeline import add_export_arguments, export_checkpoint, options_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python export/to_onnx.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, backends=("python", "onnxruntime"))
    export_checkpoint(options_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
