#!/bin/sh
# combo MMAP TRIM: residue harness + faults with glibc's thresholds from the environment (gateway flag 0)
cd "$(git rev-parse --show-toplevel)"
[ "$1" != - ] && export MALLOC_MMAP_THRESHOLD_=$1; [ "$2" != - ] && export MALLOC_TRIM_THRESHOLD_=$2; [ -n "$3" ] && export MALLOC_ARENA_MAX=$3
echo "== mmap $1 trim $2 arenas $3"
PYTHONPATH=. timeout 300 .venv/bin/python - 0 <<'PY' 2>&1 | grep closed | sed 's/.*anon/anon/'
import sys, runpy
import benchmarks.servers as s
orig = s.GatewayServer.__init__
def init(self, repo, *extra, **kw):
    orig(self, repo, *extra, "--mmap-threshold-kb", "0", **kw)
s.GatewayServer.__init__ = init
sys.argv = ["x", "82", "few"]
runpy.run_path("benchmarks/results/2026-12-03-vm-robustness-proxy/memory-check/heap_residue.py", run_name="__main__")
PY
PYTHONPATH=. timeout 300 .venv/bin/python benchmarks/results/2026-12-03-vm-robustness-proxy/memory-check/heap_faults.py 0
