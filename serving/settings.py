"""Gateway settings from command-line flags and `EE_*` environment variables.

Precedence: flag, then environment variable, then default. Every value is
validated; a bad one stops the gateway with one line naming the setting.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from common.errors import UserError


class Settings(BaseModel, extra="forbid"):
    model_repository: Path = Field(Path("model_repository"), description="repository with manifest.json")
    backend: Literal["onnxruntime", "triton"] = Field("onnxruntime", description="where the stages run")
    triton_url: str = Field("127.0.0.1:8001", description="Triton address for --backend triton")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="protocol to Triton")
    host: str = Field("127.0.0.1", description="address the gateway binds to")
    http_port: int = Field(8080, ge=0, le=65535, description="KServe v2 HTTP port")
    grpc_port: int = Field(8081, ge=-1, le=65535, description="KServe v2 gRPC port (-1: no gRPC)")
    max_batch_size: int = Field(64, ge=1, le=4096, description="largest batch a stage runs")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a deep stage waits for samples upstream")
    workers: int = Field(2, ge=1, le=256, description="concurrent backend calls")
    intra_op_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime threads per session")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device")
    default_policy: Literal["confidence", "budget", "fixed", "full"] = Field(
        "confidence", description="policy of requests that name none")
    default_threshold: float = Field(0.9, ge=0, description="threshold of exits the manifest has none for")
    max_body_mb: float = Field(32, gt=0, description="largest request body (HTTP) or message (gRPC)")
    max_request_batch: int = Field(256, ge=1, description="most images in one request")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(False, description="log every HTTP request")


def env_name(field: str) -> str:
    return f"EE_{field.upper()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env {env_name(name)}, default {field.default})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def load_settings(args: argparse.Namespace | None = None, environ: dict | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values = {}
    for name in Settings.model_fields:
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            values[name] = flag_value
        elif env_name(name) in environ:
            values[name] = environ[env_name(name)]
    try:
        return Settings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        raise UserError(f"invalid setting {name} (--{name.replace('_', '-')} / {env_name(name)}): "
                        f"{first['msg']}") from None
