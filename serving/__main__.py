"""Run the early-exit gateway.

    python -m serving --model-repository model_repository --backend onnxruntime \\
        --http-port 8080 --grpc-port 8081

Every flag can also be set with an environment variable, EE_ and the flag's
name in capitals (--http-port: EE_HTTP_PORT; all are listed below); flags win.
The gateway serves KServe v2 over HTTP and gRPC (so tritonclient works
unchanged), POST /v1/classify for image files, and /metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import signal
import threading

import uvicorn

from common.errors import run_cli
from serving.app import Gateway, configure_logging
from serving.settings import load_settings, settings_parser


class GracefulUvicornServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after a graceful shutdown; we exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser(prog="python -m serving", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = load_settings(argv, parser)
    configure_logging(settings.log_level)
    gateway = Gateway(settings)
    # uvloop when installed (the serve extra pins it): a cheaper event loop for both front ends.
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config = uvicorn.Config(gateway.http_app, host=settings.host, port=settings.http_port, loop=loop,
                            log_config=None, access_log=settings.access_log, timeout_graceful_shutdown=30,
                            log_level=settings.log_level)
    logging.getLogger("uvicorn.error").setLevel(settings.log_level.upper())
    GracefulUvicornServer(config).run()  # SIGINT/SIGTERM: stop accepting, finish in-flight requests, then exit
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
