"""Gateway settings from command-line flags and `EE_*` environment variables.

pydantic-settings reads them: flag, then environment variable (`EE_` and the
setting's name in capitals: `--http-port` is `EE_HTTP_PORT`), then default. Every
value is validated; a bad one stops the gateway with one line naming the setting.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from common.errors import UserError

ENV_PREFIX = "EE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", cli_kebab_case=True,
                                      cli_implicit_flags=True)

    model_repository: Path = Field(Path("model_repository"), description="repository with manifest.json (and "
                                   "manifest.<model>.json of further models)")
    backend: Literal["onnxruntime", "triton", "triton-cascade"] = Field(
        "onnxruntime", description="where the stages run (triton-cascade: the whole cascade in Triton's "
                                   "<model>_cascade model, one call a request)")
    triton_url: str = Field("127.0.0.1:8001", description="Triton address for --backend triton or triton-cascade")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="protocol to Triton")
    host: str = Field("127.0.0.1", description="address the gateway binds to")
    http_port: int = Field(8080, ge=0, le=65535, description="KServe v2 HTTP port")
    grpc_port: int = Field(8081, ge=-1, le=65535, description="KServe v2 gRPC port (-1: no gRPC)")
    max_batch_size: int = Field(64, ge=1, le=4096, description="largest batch a stage runs")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a deep stage waits for samples upstream")
    workers: int = Field(2, ge=1, le=256, description="concurrent backend calls (ONNX Runtime on the CPU: at "
                                                     "most one per core the gateway may run on)")
    intra_op_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime threads per session")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device")
    default_policy: Literal["confidence", "budget", "fixed", "full"] = Field(
        "confidence", description="policy of requests that name none")
    default_threshold: float = Field(0.9, ge=0, description="threshold of exits the manifest has none for")
    max_body_mb: float = Field(32, gt=0, description="largest request body (HTTP) or message (gRPC)")
    max_request_batch: int = Field(256, ge=1, description="most images in one request")
    # front ends: limits on uploads, and security (issue 25); the defaults keep a loopback gateway open
    max_image_mb: float = Field(8, gt=0, description="largest file in one /v1/classify upload")
    max_image_pixels: int = Field(16_777_216, ge=1, description="most pixels of one uploaded image (its header "
                                                                "says; refused before decoding)")
    max_request_pixels: int = Field(67_108_864, ge=1, description="most pixels of all images of one upload")
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding uploaded images")
    api_key: SecretStr | None = Field(None, description="key that inference, metadata and metrics requests must "
                                                        "send (Authorization: Bearer KEY or X-API-Key: KEY); "
                                                        "health stays open; none: open")
    docs: bool = Field(True, description="serve /docs and /openapi.json")
    tls_cert: Path | None = Field(None, description="PEM certificate: HTTPS and gRPC over TLS (with --tls-key)")
    tls_key: Path | None = Field(None, validate_default=True, description="PEM private key of --tls-cert")
    max_connections: int | None = Field(None, ge=1, description="HTTP connections and requests at once; "
                                                                "more are answered 503 (none: no limit); also "
                                                                "gRPC connections at once (more fail)")
    read_timeout_s: float = Field(30, gt=0, description="longest an HTTP client may take to send one request "
                                                        "(headers and body), or a gRPC client to set up its "
                                                        "connection; slower ones are disconnected")
    keep_alive_s: int = Field(5, ge=1, description="idle HTTP keep-alive connections close after this")
    grpc_max_concurrent_rpcs: int = Field(0, ge=0, description="gRPC calls at once; beyond, RESOURCE_EXHAUSTED "
                                          "before the call is read (0: the admission bound in images of the "
                                          "models served at start-up, summed; grpc cannot change it while it "
                                          "runs, so models loaded later are not counted and a load that makes "
                                          "the models served admit more logs a warning: set it for a gateway "
                                          "that loads models later)")
    grpc_max_pending_calls: int = Field(0, ge=0, description="gRPC calls grpc holds while the gateway is too "
                                        "busy to take them; beyond, refused at once in grpc's core, which the "
                                        "client sees as CANCELLED (0: grpc's default, 1000 to 3000)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(False, description="log every HTTP request")
    # Overload, deadlines and shutdown (issue 25).
    request_timeout_s: float = Field(30.0, ge=0, description="deadline of requests whose client gives none "
                                     "(gRPC deadline, `timeout` parameter or header); 0: none")
    max_queue_images: int = Field(0, ge=0, description="images admitted into the cascade at once; beyond, "
                                  "429 / RESOURCE_EXHAUSTED (0: --max-queue-ms of work at the profiled speed)")
    max_queue_ms: float = Field(300.0, gt=0, description="work the default queue bound holds, in ms (on "
                                "the cores the gateway may run on, at most --workers)")
    backend_nice: int = Field(10, ge=0, le=19, description="nice value of the backend threads (Linux): on "
                              "saturated cores the event loop (admission, refusals, answers) goes first; 0: as "
                              "the process")
    optional_nice: int | None = Field(None, ge=-1, le=19, description="nice value (Linux) of the one backend "
                                      "thread that runs the budget policy's optional deeper stages (never on "
                                      "the --workers slots, so no first stage waits for a slot behind them; "
                                      "higher: they yield more CPU, and more of them are answered from the exit "
                                      "they passed); default --backend-nice; -1: no such thread, they share the "
                                      "--workers slots")
    budget_reserve: float = Field(0.2, ge=0, lt=1, description="share of a latency budget the budget policy "
                                  "keeps for what the cascade does not see (transport, the client), on top of the "
                                  "front end's queue (requests in flight x the measured CPU per request outside "
                                  "backend calls): "
                                  "a request goes on to the next stage only if it would finish before the rest")
    mmap_threshold_kb: int = Field(128, ge=0, le=32768, description="allocations of this many KiB and more get "
                                   "memory of their own, given back when freed (glibc's mmap threshold, fixed: "
                                   "its moving default let bursts of large batches leave the heap at 1.1-1.2x "
                                   "its baseline after an overload); 0: glibc's default")
    malloc_arenas: int = Field(1, ge=0, le=1024, description="at most this many glibc malloc arenas (its default, "
                               "8 per core, lets each thread's arena fragment and keep more of the heap after an "
                               "overload); 0: glibc's default")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may run "
                                    "before they are answered UNAVAILABLE (exit status 3 if any)")
    health_interval_ms: float = Field(250.0, gt=0, le=10000, description="how often the Triton backend's "
                                      "health is polled (readiness follows it)")
    triton_timeout_s: float = Field(10.0, gt=0, description="longest Triton call (a request's deadline "
                                    "shortens it)")
    triton_fallback: bool = Field(False, description="run on embedded ONNX Runtime while Triton is down "
                                  "(--backend triton)")
    # Several models and new versions (issue 26).
    poll_repository_s: float = Field(0.0, ge=0, description="how often the repository's manifests are checked "
                                     "for new models and versions, loaded without a restart, and for "
                                     "removed manifests, whose models are unloaded (0: never; "
                                     "POST /v2/repository/models/NAME/load loads on demand)")

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _existing_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no file {path}")
        return path

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if (key is None) != (info.data.get("tls_cert") is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return key


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


class _OneLineErrors(argparse.ArgumentParser):
    """Flag errors (unknown flag, value not among the choices) as one line, like validation errors."""

    def error(self, message: str):
        raise UserError(message)


def settings_parser(**kwargs) -> argparse.ArgumentParser:
    """An argument parser whose help lists every setting, its default and its environment variable."""
    environment = ", ".join(env_name(name) for name in Settings.model_fields)
    epilog = textwrap.fill(f"Environment variables, used for flags not given: {environment}.", width=79)
    return _OneLineErrors(epilog=epilog, **kwargs)


def load_settings(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Settings:
    """Settings from `argv` (default: the command line) parsed by `parser`, the environment and defaults."""
    flags = CliSettingsSource(Settings, root_parser=parser or settings_parser())
    try:
        return Settings(_cli_settings_source=flags(args=sys.argv[1:] if argv is None else argv))
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        raise UserError(f"invalid setting {name} (--{name.replace('_', '-')} / {env_name(name)}): "
                        f"{first['msg']}") from None
