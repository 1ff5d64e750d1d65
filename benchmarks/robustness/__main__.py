"""`python -m benchmarks.robustness`."""

from benchmarks.robustness.cli import main
from common.errors import run_cli

raise SystemExit(run_cli(main))
