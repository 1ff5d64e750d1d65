"""Start the servers a benchmark measures: gateway processes and a tritonserver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common.triton_launcher import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


class GatewayServer:
    """`python -m serving` on free loopback ports, ready when its health endpoint says so."""

    def __init__(self, repository: Path, *extra: str, log_path: Path | None = None, timeout: float = 120) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        command = [sys.executable, "-m", "serving", "--model-repository", str(repository), "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *extra]
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start (see {log_path})")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.http_url}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if hasattr(self.log, "close"):
            self.log.close()

    def __enter__(self) -> GatewayServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
