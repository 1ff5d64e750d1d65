"""Export a multi-exit network to ONNX, per exit and per segment, and validate it.

Per-exit models map the image to one exit's logits (the whole prefix). Per-segment
models map segment k's input to exit k's logits and the activations segment k+1
takes, so a cascade continues where it stopped. Every model is compared with
PyTorch on real held-out images before anything is written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.checkpoint_meta import CheckpointMeta
from common.manifest import FEATURES_INPUT, FEATURES_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT, TensorSpec
from common.onnxruntime_session import create_session
from training.models import MultiExitNet

OPSET = 17


class ExportValidationError(Exception):
    """An exported model disagrees with PyTorch beyond tolerance."""


@dataclass(frozen=True)
class ExportedModel:
    kind: str  # "exit" or "segment"
    exit_index: int
    onnx_bytes: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_abs_error: float
    top1_agreement: float
    parallel_branches: int = 1  # independent branches ONNX Runtime may run at once


class _ExitPrefix(nn.Module):
    def __init__(self, model: MultiExitNet, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_until(self.index, images)[0]


class _Stage(nn.Module):
    """Segments after exit `start` (exclusive, -1 = from the image) up to exit `end`."""

    def __init__(self, model: MultiExitNet, start: int, end: int, last: bool) -> None:
        super().__init__()
        self.model, self.start, self.end, self.last = model, start, end, last

    def forward(self, x: torch.Tensor):
        for index in range(self.start + 1, self.end + 1):
            logits, x = self.model.run_segment(index, x)
        return logits if self.last else (logits, x)


def _to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]) -> bytes:
    module.eval()  # export in training mode gives wrong BatchNorm statistics
    import io

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [input_name, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example,), buffer, input_names=[input_name], output_names=output_names,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return buffer.getvalue()


def _run_in_batches(session, inputs: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    input_name = session.get_inputs()[0].name
    chunks = [session.run(None, {input_name: inputs[i:i + batch]}) for i in range(0, len(inputs), batch)]
    return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(chunks[0]))]


def _compare(name: str, got: np.ndarray, expected: np.ndarray, tolerance: float, min_agreement: float):
    error = float(np.abs(got - expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if not error <= tolerance or agreement < min_agreement:
        raise ExportValidationError(
            f"{name}: ONNX Runtime differs from PyTorch: max abs error {error:.3g} (tolerance {tolerance:g}), "
            f"top-1 agreement {agreement * 100:.2f}% (required {min_agreement * 100:.2f}%) on {len(got)} images"
        )
    return error, agreement


def export_and_validate(
    model: MultiExitNet,
    images: np.ndarray,
    exit_indices: list[int],
    tolerance: float = 1e-4,
    min_agreement: float = 0.999,
) -> list[ExportedModel]:
    """Export a per-exit model and a segment (stage) for each of `exit_indices`.

    The segment of a chosen exit runs from the previous chosen exit (or the image).

    `images` are normalised float32 NCHW held-out images. Raises
    ExportValidationError naming the model and the numbers on any mismatch.
    """
    model = model.eval()
    tensor = torch.from_numpy(images)
    with torch.no_grad():
        reference = model(tensor)
    exported: list[ExportedModel] = []
    example = tensor[:2]
    input_spec = TensorSpec(IMAGE_INPUT, list(images.shape[1:]))
    for index in sorted(exit_indices):
        onnx_bytes = _to_onnx(_ExitPrefix(model, index), example, IMAGE_INPUT, [LOGITS_OUTPUT])
        (logits,) = _run_in_batches(create_session(onnx_bytes, intra_op_threads=2), images)
        error, agreement = _compare(f"exit {model.exits[index].depth}", logits,
                                    reference[index].numpy(), tolerance, min_agreement)
        out_spec = TensorSpec(LOGITS_OUTPUT, [model.num_classes])
        branches = getattr(model, "parallel_branches", None)  # an anytime ensemble's members
        exported.append(ExportedModel("exit", index, onnx_bytes, [input_spec], [out_spec], error, agreement,
                                      branches(index) if branches else 1))

    # Stages between consecutive chosen exits: chain them through ONNX Runtime.
    features, features_torch = images, tensor
    chosen = sorted(exit_indices)
    for position, index in enumerate(chosen):
        start = chosen[position - 1] if position else -1
        last = position == len(chosen) - 1
        outputs = [LOGITS_OUTPUT] if last else [LOGITS_OUTPUT, FEATURES_OUTPUT]
        input_name = IMAGE_INPUT if position == 0 else FEATURES_INPUT
        stage = _Stage(model, start, index, last)
        in_spec = TensorSpec(input_name, list(features.shape[1:]))
        onnx_bytes = _to_onnx(stage, features_torch[:2], input_name, outputs)
        results = _run_in_batches(create_session(onnx_bytes, intra_op_threads=2), features)
        error, agreement = _compare(f"segment to exit {model.exits[index].depth} (chained)",
                                    results[0], reference[index].numpy(), tolerance, min_agreement)
        out_specs = [TensorSpec(LOGITS_OUTPUT, [model.num_classes])]
        if not last:
            with torch.no_grad():
                features_torch = _Stage(model, start, index, False)(features_torch)[1]
            out_specs.append(TensorSpec(FEATURES_OUTPUT, list(features_torch.shape[1:])))
            features = results[1]
        exported.append(ExportedModel("segment", index, onnx_bytes, [in_spec], out_specs, error, agreement))
    return exported


def validation_images(checkpoint_meta: CheckpointMeta, data: Path | None, count: int) -> np.ndarray:
    """`count` normalised held-out images of the checkpoint's dataset (never test)."""
    from training.datasets import heldout_split, load_split_for_model
    from training.transforms import to_normalized

    train = load_split_for_model(checkpoint_meta.dataset_source(data), "train", checkpoint_meta.input_size)
    _, heldout_idx = heldout_split(len(train), checkpoint_meta.heldout.size, checkpoint_meta.heldout.seed)
    if len(heldout_idx) == 0:
        heldout_idx = np.arange(len(train))
    chosen = heldout_idx[:count]
    norm = checkpoint_meta.normalization
    return to_normalized(train.images[chosen], norm.mean, norm.std).numpy()
