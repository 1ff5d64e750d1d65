"""Start the servers a benchmark measures: gateway processes and a tritonserver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.triton_launcher import LoopbackServer, free_ports, http_ready, stop_process
from common.paths import REPO_ROOT


class GatewayServer(LoopbackServer):
    """`python -m serving` on free loopback ports, ready when its health endpoint says so."""

    def __init__(self, repository: Path, *extra: str, log_path: Path | None = None, timeout: float = 120) -> None:
        self.http_port, self.grpc_port = free_ports(2)
        command = [sys.executable, "-m", "serving", "--model-repository", str(repository), "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *extra]
        self.log_path = log_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        deadline = time.monotonic() + timeout
        while not http_ready(self.http_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = log_path.read_text()[-2000:] if log_path else ""
                raise RuntimeError(f"gateway did not start (exit {self.process.returncode}): {log}")
            time.sleep(0.1)  # polling the health endpoint, not waiting blindly

    def ready_fields(self) -> dict:
        """The fields of the gateway's `gateway ready` log line (empty without a log file, or before it)."""
        if self.log_path is None or not self.log_path.exists():
            return {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"gateway ready"' in line:
                try:
                    return json.loads(line)
                except ValueError:
                    return {}
        return {}

    @property
    def metrics_url(self) -> str:
        return f"http://{self.http_url}/metrics"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> int:
        """Terminate gracefully (SIGTERM), kill after 30 s; returns the exit status."""
        status = stop_process(self.process)
        if hasattr(self.log, "close"):
            self.log.close()
        return status

    def __enter__(self) -> GatewayServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
