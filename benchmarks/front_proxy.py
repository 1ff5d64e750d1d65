"""nginx in front of a gateway, from `deploy/nginx/templates/default.conf.template` (issue 25: calls over a
limit on requests in flight are refused by nginx, before the gateway's Python sees them).

    with FrontProxy(gateway.grpc_url, gateway.http_url, max_in_flight=120, cores=(0,)) as proxy:
        ...  # clients use proxy.grpc_url / proxy.http_url

The template is rendered as the official nginx image renders its templates (`${NAME}` replaced from a
mapping, nginx's own `$variables` untouched), into a directory of its own with a minimal main
configuration (one worker by default, no access log, every path under that directory), and nginx runs in
the foreground as a child of this process. Needs the `nginx` binary (Debian: `apt-get install
nginx-light`); `nginx_binary()` says where it is or why not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.triton_launcher import free_ports
from common.errors import UserError
from common.paths import REPO_ROOT

TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "templates" / "default.conf.template"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def nginx_binary() -> str:
    """The nginx executable, or UserError saying how to install it."""
    found = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(path, os.X_OK)), None)
    if found is None:
        raise UserError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light); "
                        "the front proxy needs it")
    return found


def render(template: str, values: dict[str, object]) -> str:
    """`template` with every `${NAME}` replaced by values[NAME]; a placeholder without a value is an error
    (nginx would start with a literal `${...}` and fail later, or worse, not fail)."""
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise UserError(f"no value for {', '.join(missing)} in the nginx template")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


def main_config(directory: Path, workers: int) -> str:
    """A main configuration that keeps everything (pid, logs, temporary files) under `directory`."""
    temp = directory / "tmp"
    return "\n".join([
        f"worker_processes {workers};",
        "daemon off;",
        f"pid {directory / 'nginx.pid'};",
        f"error_log {directory / 'error.log'} warn;",
        "events { worker_connections 16384; }",
        "http {",
        "    access_log off;",
        *(f"    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"    include {directory / 'default.conf'};",
        "}", ""])


class FrontProxy:
    """nginx on free loopback ports in front of the gateway at `gateway_grpc` / `gateway_http` (host:port),
    refusing calls beyond `max_in_flight` per front end; its processes pinned to `cores` when given."""

    def __init__(self, gateway_grpc: str, gateway_http: str, max_in_flight: int, cores: tuple[int, ...] | None = None,
                 workers: int = 1, template: Path = TEMPLATE, timeout: float = 20.0) -> None:
        if max_in_flight < 1:
            raise UserError(f"the front proxy's limit on requests in flight must be at least 1, not {max_in_flight}")
        binary = nginx_binary()
        self.max_in_flight = max_in_flight
        self.directory = Path(tempfile.mkdtemp(prefix="ee-nginx-"))
        (self.directory / "tmp").mkdir()
        grpc_port, http_port = free_ports(2)
        self.grpc_url, self.http_url = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
        values = {"EE_GATEWAY_GRPC": gateway_grpc, "EE_GATEWAY_HTTP": gateway_http,
                  "EE_PROXY_GRPC_PORT": f"127.0.0.1:{grpc_port}", "EE_PROXY_HTTP_PORT": f"127.0.0.1:{http_port}",
                  "EE_PROXY_MAX_IN_FLIGHT": max_in_flight}
        (self.directory / "default.conf").write_text(render(template.read_text(), values))
        (self.directory / "nginx.conf").write_text(main_config(self.directory, workers))
        command = [binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                   "-e", str(self.directory / "error.log")]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise UserError(f"nginx rejected the front proxy's configuration: {checked.stderr.strip()[-1500:]}")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        deadline = time.monotonic() + timeout
        while not all(_listening(url) for url in (self.grpc_url, self.http_url)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start (exit {self.process.returncode}): {self.error_log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> int:
        """A graceful stop (SIGQUIT: connections finish their calls), killed after 10 s; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> FrontProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(url: str) -> bool:
    import socket

    host, port = url.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
        return True
    except OSError:
        return False
