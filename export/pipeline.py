"""Checkpoint -> validated ONNX -> Triton model repository (the logic behind the CLIs)."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.manifest import BACKENDS, Manifest
from common.paths import DEFAULT_CHECKPOINT, REPO_ROOT
from common.provenance import git_commit
from export.triton_config import BatchingConfig

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    exits: str | None = None  # "15,25,56"; None = every exit
    output: Path = DEFAULT_REPOSITORY
    backend: str = "python"
    data: Path | None = None
    validation_images: int = 1000
    tolerance: float = 1e-4
    force: bool = False
    batching: BatchingConfig = BatchingConfig()
    model_name: str | None = None  # the served name (default: the checkpoint's registry name)


def add_export_arguments(parser: argparse.ArgumentParser, backends=BACKENDS, default_backend="python") -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="checkpoint .safetensors with its .json (default: the committed reference one)")
    parser.add_argument("--exits", default=None,
                        help="exit depths as the checkpoint names them, e.g. 15,25,56 (default: all)")
    parser.add_argument("--output", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository directory")
    add_writer_arguments(parser, backends, default_backend)
    parser.add_argument("--model-name", default=None,
                        help="name the model is served under (default: the checkpoint's registry name); a "
                             "repository holds several models of different names, each with its own manifest")


def add_writer_arguments(parser: argparse.ArgumentParser, backends=BACKENDS, default_backend="python") -> None:
    """Options of validation and of the repository writer (shared by to_onnx, to_trt and compose)."""
    described = {"python": "python: model.py running ONNX Runtime (loads in the CPU tritonserver of nvidia-pytriton)",
                 "onnxruntime": "onnxruntime: onnxruntime_onnx platform (full Triton image)",
                 "tensorrt": "tensorrt: tensorrt_plan engines"}
    parser.add_argument("--backend", choices=backends, default=default_backend,
                        help="; ".join(described[name] for name in backends))
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset for validation images (default: the checkpoint's own)")
    parser.add_argument("--validation-images", type=int, default=1000,
                        help="held-out images every model is checked on against PyTorch (default 1000)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit error allowed (default 1e-4)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=200, help="Triton dynamic batcher delay")
    parser.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    parser.add_argument("--force", action="store_true",
                        help="replace the repository's models (all of them) instead of adding a new version")


def batching_from_args(args: argparse.Namespace) -> BatchingConfig:
    """The Triton batching of --max-batch-size, --max-queue-delay-us and --instances (checked)."""
    if args.max_batch_size < 1 or args.instances < 1 or args.validation_images < 1:
        raise UserError("--max-batch-size, --instances and --validation-images must be positive")
    preferred = tuple(b for b in (8, 16, 32, 64) if b <= args.max_batch_size)
    return BatchingConfig(args.max_batch_size, preferred, args.max_queue_delay_us, args.instances)


def check_model_name(name: str | None, option: str = "--model-name") -> None:
    if name is not None and not MODEL_NAME.match(name):
        raise UserError(f"{option} must be letters, digits, '_' or '-' (at most 64), got {name!r}")


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    batching = batching_from_args(args)
    model_name = getattr(args, "model_name", None)
    check_model_name(model_name)
    return ExportOptions(args.checkpoint, args.exits, args.output, args.backend, args.data,
                         args.validation_images, args.tolerance, args.force, batching, model_name)


def parse_exit_depths(text: str | None, available: list[int]) -> list[int]:
    if not text:
        return list(available)
    try:
        depths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--exits must be comma-separated depths, got {text!r}") from None
    unknown = [d for d in depths if d not in available]
    if unknown or not depths:
        named = ", ".join(map(str, unknown)) if unknown else repr(text)
        raise UserError(f"no exit at depth {named}; available depths: {', '.join(map(str, available))}")
    return depths


def export_checkpoint(options: ExportOptions, plan_builder=None, log=print) -> Manifest:
    """Export, validate and write the repository; returns its manifest."""
    from export.onnx_export import ExportValidationError, export_and_validate, validation_images
    from export.repository import write_repository
    from training.checkpoint import load_checkpoint

    model, meta = load_checkpoint(options.checkpoint)
    depths = parse_exit_depths(options.exits, model.exit_depths)
    indices = [model.exit_index(depth) for depth in depths]
    images = validation_images(meta, options.data, options.validation_images)
    name = options.model_name or meta.model
    log(f"exporting {meta.model} as {name} exits {depths} ({len(images)} held-out validation images)")
    try:
        exported = export_and_validate(model, images, indices, options.tolerance)
    except ExportValidationError as error:
        raise UserError(f"validation failed, nothing written: {error}") from None
    for item in exported:
        kind = "exit" if item.kind == "exit" else "segment to exit"
        log(f"  {kind} {model.exits[item.exit_index].depth}: max abs error {item.max_abs_error:.2e}, "
            f"top-1 agreement {item.top1_agreement * 100:.2f}%")
    source = {"checkpoint": str(options.checkpoint), "checkpoint_commit": meta.git_commit,
              "export_commit": git_commit(), "command": " ".join(sys.argv),
              "validation": {"images": len(images), "tolerance": options.tolerance,
                             "max_abs_error": max(item.max_abs_error for item in exported)}}
    manifest = write_repository(options.output, exported, meta, options.backend, options.batching,
                                options.force, source, plan_builder, progress=log, model_name=name)
    log(f"wrote {len(exported)} models and the manifest to {options.output}")
    return manifest
