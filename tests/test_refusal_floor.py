"""benchmarks/profiles/refusal_floor.py end to end on a real grpc.aio servicer: the calls add up and each
variant answers as it says (no timing assertions)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: server and load apart")
def test_refusal_floor_counts_every_call_of_each_variant(tmp_path):
    output = tmp_path / "floor.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/profiles/refusal_floor.py"), "--output", str(output),
                    "--rate", "200", "--seconds", "1", "--rounds", "1", "--delay-ms", "20",
                    "--port", str(_free_port())], check=True, cwd=ROOT, timeout=120)
    records = {record["variant"]: record for record in map(json.loads, output.read_text().splitlines())}
    assert set(records) == {"grpc-limit", "handler", "answer"}
    for record in records.values():
        assert sum(record["outcomes"].values()) == record["sent"] > 0
        assert record["server_cpu_s"] > 0 and record["server_cpu_ms_per_call"] > 0
        assert record["commit"] and record["command"] and record["date"]
    assert records["answer"]["outcomes"] == {"ok": records["answer"]["sent"]}
    for variant in ("grpc-limit", "handler"):  # mostly refused; a few answered (held call, warm-up message)
        outcomes = records[variant]["outcomes"]
        assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}
        assert outcomes["RESOURCE_EXHAUSTED"] > outcomes.get("ok", 0)
        assert records[variant]["refusal_latency_ms"]["p99"] >= records[variant]["refusal_latency_ms"]["p50"]
    assert records["grpc-limit"]["examples"]["RESOURCE_EXHAUSTED"] == "Concurrent RPC limit exceeded!"
