"""Checkpoints: safetensors weights plus a JSON metadata file beside them.

`<stem>.safetensors` holds the weights, `<stem>.json` what a reader needs to
rebuild and use the model (name, classes, input size, normalisation, exits,
held-out split, training config, provenance). Both are written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from training.models import MultiExitNet, create_model

FORMAT_VERSION = 1


def metadata_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count()
    return f"{platform.node()} ({platform.machine()}, {cores} CPU cores" + (f", {gpu})" if gpu else ")")


def build_metadata(model: MultiExitNet, *, classes, mean, std, heldout: dict,
                   training: dict, extra: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "num_classes": model.num_classes,
        "classes": list(classes),
        "input_size": list(model.input_size),
        "normalization": {"mean": list(mean), "std": list(std), "scale": "uint8 / 255"},
        "exits": [asdict(spec) for spec in model.exits],
        "heldout": heldout,
        "training": training,
        "git_commit": git_commit(),
        "machine": machine_description(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(path: Path, model: MultiExitNet, metadata: dict) -> None:
    """Write weights then metadata, each via a temporary file and rename."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(path, lambda tmp: save_file(state, str(tmp), metadata={"model": model.name}))
    text = json.dumps(metadata, indent=2) + "\n"
    _atomic_write_bytes(metadata_path(path), lambda tmp: tmp.write_text(text))


def load_metadata(path: Path) -> dict:
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not meta_file.exists():
        raise UserError(f"checkpoint metadata not found: {meta_file} (expected beside {path.name})")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"checkpoint metadata {meta_file} is not valid JSON: {error}") from None


def load_checkpoint(path: Path) -> tuple[MultiExitNet, dict]:
    """Rebuild the model from metadata and load its weights (eval mode)."""
    metadata = load_metadata(path)
    model = create_model(metadata["model"], num_classes=metadata["num_classes"],
                         **metadata.get("training", {}).get("model_kwargs", {}))
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise UserError(f"cannot read checkpoint weights {path}: {error}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match model {metadata['model']}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model, metadata


def save_resume_state(path: Path, state: dict) -> None:
    _atomic_write_bytes(Path(path), lambda tmp: torch.save(state, tmp))
