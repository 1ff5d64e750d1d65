"""Checkpoints: safetensors weights plus a JSON metadata file beside them.

`<stem>.safetensors` holds the weights, `<stem>.json` what a reader needs to
rebuild and use the model (`common.checkpoint_meta.CheckpointMeta`: name,
classes, input size, normalisation, exits, held-out split, training config,
provenance). Both are written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint_meta import (
    CheckpointExit,
    CheckpointMeta,
    HeldoutSplit,
    Normalization,
    metadata_path,
    read_checkpoint_meta,
)
from common.errors import UserError
from common.provenance import git_commit, machine_description, utc_timestamp
from training import attach as _attach  # noqa: F401  (registers the backbone entries: tv_*, timm_*)
from training.models import MultiExitNet, create_model


def this_machine() -> str:
    """The machine description, with the GPU's name when there is one."""
    return machine_description(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def snapshot_path(output: Path, epoch: int) -> Path:
    """Where `--snapshots` keeps the weights after `epoch` (for training.average)."""
    return output.parent / f"{output.stem}.snapshots" / f"epoch_{epoch:03d}.safetensors"


def build_metadata(model: MultiExitNet, *, classes, mean, std, heldout: dict,
                   training: dict, **progress) -> CheckpointMeta:
    """Metadata of `model` as it is now; `progress`: epochs_completed, epochs_planned, heldout_acc."""
    return CheckpointMeta(
        model=model.name,
        num_classes=model.num_classes,
        classes=list(classes),
        input_size=list(model.input_size),
        normalization=Normalization(list(mean), list(std)),
        exits=[CheckpointExit(**asdict(spec)) for spec in model.exits],
        heldout=HeldoutSplit(**heldout),
        training=training,
        git_commit=git_commit(),
        machine=this_machine(),
        date=utc_timestamp(),
        **progress,
    )


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(path: Path, model: MultiExitNet, metadata: CheckpointMeta) -> None:
    """Write weights then metadata, each via a temporary file and rename."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(path, lambda tmp: save_file(state, str(tmp), metadata={"model": model.name}))
    text = json.dumps(metadata.to_dict(), indent=2) + "\n"
    _atomic_write_bytes(metadata_path(path), lambda tmp: tmp.write_text(text))


def load_metadata(path: Path) -> CheckpointMeta:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return read_checkpoint_meta(path)


def load_checkpoint(path: Path) -> tuple[MultiExitNet, CheckpointMeta]:
    """Rebuild the model from metadata and load its weights (eval mode)."""
    metadata = load_metadata(path)
    model = create_model(metadata.model, num_classes=metadata.num_classes, input_size=tuple(metadata.input_size),
                         **metadata.model_kwargs)
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise UserError(f"cannot read checkpoint weights {path}: {error}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match model {metadata.model}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model, metadata


def save_resume_state(path: Path, state: dict) -> None:
    _atomic_write_bytes(Path(path), lambda tmp: torch.save(state, tmp))
