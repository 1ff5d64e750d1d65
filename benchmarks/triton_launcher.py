"""Start and stop a real `tritonserver` from the nvidia-pytriton wheel: the harness of
the Triton benchmarks and integration tests (stdlib only).

The wheel ships a CPU `tritonserver` 2.51 with the Python backend only. It lives
in its own virtualenv (`.venv-triton`, numpy<2) so that it cannot disturb the
project's environment; `make triton` creates it. See ../shared/TRITON.md.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.paths import REPO_ROOT

DEFAULT_VENV = Path(os.environ.get("EE_TRITON_VENV", REPO_ROOT / ".venv-triton"))


class TritonUnavailable(RuntimeError):
    """The Triton virtualenv or its server binary is missing."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: every socket stays bound until all are chosen (ports picked
    one after another can repeat: Triton refused to start with its gRPC and metrics ports equal)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def http_ready(address: str) -> bool:
    """Whether a KServe v2 server at host:port answers its readiness endpoint with 200."""
    try:
        with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process(process: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    """SIGTERM (a graceful stop), SIGKILL after `timeout` seconds; returns the exit status."""
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def triton_installed(venv: Path = DEFAULT_VENV) -> bool:
    """Whether `venv` is a Triton virtualenv (`make triton` creates one)."""
    try:
        _site_packages(venv)
    except TritonUnavailable:
        return False
    return True


def _site_packages(venv: Path) -> Path:
    found = glob.glob(str(venv / "lib" / "python3*" / "site-packages"))
    if not found:
        raise TritonUnavailable(f"no Triton virtualenv at {venv}: run `make triton`")
    return Path(found[0])


def server_command(venv: Path, repository: Path, http_port: int, grpc_port: int, metrics_port: int):
    """Command line and environment that run tritonserver on `repository`."""
    site = _site_packages(venv)
    root = site / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        raise TritonUnavailable(f"{binary} not found: install nvidia-pytriton==0.7.0 into {venv}")
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():  # the stub must match the venv's Python version
        version = site.parent.name.removeprefix("python")
        shutil.copy(root / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": f"{site / 'nvidia_pytriton.libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    }
    command = [
        str(binary), f"--model-repository={repository}", f"--backend-directory={root / 'backends'}",
        "--http-address=127.0.0.1", f"--http-port={http_port}",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
        "--log-verbose=0", "--exit-on-error=true",
    ]
    return command, env


class LoopbackServer:
    """A server process of ours on loopback ports `http_port` and `grpc_port`."""

    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@dataclass
class TritonServer(LoopbackServer):
    """A running tritonserver on loopback; use as a context manager."""

    repository: Path
    venv: Path = DEFAULT_VENV
    startup_timeout: float = 120.0
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: subprocess.Popen | None = None

    def start(self) -> TritonServer:
        command, env = server_command(self.venv, Path(self.repository), self.http_port, self.grpc_port,
                                      self.metrics_port)
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode} during start-up"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            if self.ready():
                return self
            time.sleep(0.1)  # polling the health endpoint, not waiting blindly
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.startup_timeout:.0f} s")

    def ready(self) -> bool:
        return http_ready(self.http_url)

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
