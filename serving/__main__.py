"""Run the early-exit gateway.

    python -m serving --model-repository model_repository --backend onnxruntime \\
        --http-port 8080 --grpc-port 8081

Every flag can also be set with an environment variable, EE_ and the flag's
name in capitals (--http-port: EE_HTTP_PORT; all are listed below); flags win.
The gateway serves KServe v2 over HTTP and gRPC (so tritonclient works
unchanged), POST /v1/classify for image files, and /metrics.

On SIGTERM (or SIGINT) readiness goes false and both front ends stop taking new
requests at once; in-flight requests get --shutdown-grace-s to finish, and those
that cannot are answered UNAVAILABLE. Exit status 0 when every request finished,
3 when the shutdown cut some (logged).
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
from serving.http_server import uvicorn_options
from serving.settings import load_settings, settings_parser

EXIT_REQUESTS_CUT = 3


class GracefulUvicornServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after a graceful shutdown; we exit with our own status instead.
    The signal also starts the gateway's drain at once (gRPC included), not after HTTP's."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig, frame) -> None:
        self.gateway.request_shutdown()
        super().handle_exit(sig, frame)

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
                            log_config=None, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.shutdown_grace_s + 5,
                            log_level=settings.log_level, **uvicorn_options(settings))
    logging.getLogger("uvicorn.error").setLevel(settings.log_level.upper())
    GracefulUvicornServer(config, gateway).run()  # SIGINT/SIGTERM: stop accepting, finish in-flight, exit
    return EXIT_REQUESTS_CUT if gateway.cut else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
