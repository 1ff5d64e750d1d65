"""The gateway under overload, cancellations, shutdown, backend faults and hostile uploads
(issue 25): each phase against a real gateway process (and a real tritonserver for the
fault phase), with real clients; the figures and whether each target is met go to
benchmarks/results/<run>/robustness.json.

    python -m benchmarks.robustness                           # every phase, the issue's durations
    python -m benchmarks.robustness --phases overload,budget  # some phases
    python -m benchmarks.robustness --quick                   # every phase, seconds each (a smoke test)

Phases:
- capacity: closed loop at c=32 (one image a request): the throughput the others scale from;
- overload: open loop at 3x capacity for --overload-s: successes per second against capacity,
  p99 of admitted requests, how fast refusals (429 / RESOURCE_EXHAUSTED) come, and the
  gateway's memory before, at the end, and --settle-s after the load stops; then the capacity
  closed loop again on the same gateway: the served share is judged against the mean of the
  windows before and after (the host's speed drifts over minutes);
- cancellation: 200 gRPC calls x 16 images at once with a 300 ms deadline: the share of the
  expired requests' images the gateway still computed (stage-0 samples from /metrics);
- shutdown: a backlog of --backlog-s of work, SIGTERM, grace --grace-s: every request must be
  answered (success or UNAVAILABLE), none dropped; the exit status says whether any was cut;
- triton: tritonserver killed (-9) under the gateway's Triton backend: time until the gateway is
  not ready, and from Triton's return until it is ready and serving;
- budget: fixed exit 1 (the first exit alone) at c=16 and c=32 gives its p99; the budget policy
  at 1x and 1.5x that p99: share within budget and accuracy against the first exit's;
- soak: closed loop at c=32, four policies mixed, for --soak-s: errors, duplicates, memory slope
  after the first fifth;
- bomb: 100 copies of a 7999x7999 1-bit PNG in one /v1/classify upload: time to the refusal, and
  the slowest /v2/health/ready answer meanwhile;
- fuzz: --fuzz-requests mutated requests from benchmarks.fuzz (JSON, binary, raw bodies, uploads,
  gRPC messages and bytes): findings (unexpected 5xx, UNKNOWN/INTERNAL, dropped, invalid JSON) and
  hangs; a 504 for a request whose own `timeout` expired is expected, not a finding.

Numbers from a busy machine mean little: run it on a quiet one (make robustness).
"""

# The package: runner (PHASES, the durations, Run, run), session (what the phases share), load
# (capacity, overload, budget, soak), faults (cancellation, shutdown, triton), hostile (bomb, fuzz),
# measure (helpers), cli (main; __main__ runs it).

from benchmarks.robustness.cli import main
from benchmarks.robustness.hostile import FUZZ_TARGET_REQUESTS
from benchmarks.robustness.measure import (
    Caller,
    counts,
    entry_images,
    metric,
    percentiles,
    refusal_cost,
    rss_mb,
    rss_split_mb,
    status_name,
    target,
)
from benchmarks.robustness.runner import ISSUE_DURATIONS, PHASES, QUICK_DURATIONS, Run, load_workload, run

__all__ = ["FUZZ_TARGET_REQUESTS", "ISSUE_DURATIONS", "PHASES", "QUICK_DURATIONS", "Caller", "Run", "counts",
           "entry_images", "load_workload", "main", "metric", "percentiles", "refusal_cost", "rss_mb", "rss_split_mb",
           "run", "status_name", "target"]
