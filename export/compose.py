"""Compose one early-exit cascade from several trained checkpoints, each a stage group that
starts again from the image.

    python -m export.compose \\
        --stage checkpoints/seeds/mwresnet56_5_group4.safetensors:15,25 \\
        --stage checkpoints/mwresnet56_5.safetensors \\
        --name student_then_full --model-repository model_repository

The first `--stage` (typically a cheap student, e.g. trained with `--conv group:4`) answers
the images it is confident about; the samples that continue run the next checkpoint's
network from the (normalised) image again, and so on. Each `--stage` is a checkpoint with,
after a colon, the exit depths to serve (as that checkpoint names them; default: all).

Every network is exported per exit and per segment and validated against PyTorch on
held-out images exactly as `export/to_onnx.py` does (export.onnx_export), then the
repository writer (export.repository) lays out the segments, the per-exit models, the
`<name>_cascade` Triton model and the manifest. In the manifest, the first segment of
every network after the first has `stage_input: "image"`, and exits are numbered through
the cascade: a later network's exit depth is its own depth plus the depth of the previous
network's last served exit (depths count the layers run, back to back); its `macs` and
`params` add what the earlier networks' served prefix cost (a sample that reaches the
full network has paid for the student), while `standalone_macs` is that network's exit
alone (its per-exit model, what `policy=fixed` runs). The cascade's full-network baseline
(`Manifest.full_macs`) is therefore the last network alone.

The checkpoints must share classes, input size, normalisation and held-out split (seed,
size, training-set size): the held-out images validate every stage and are what
`benchmarks.calibrate` tunes the thresholds on, so none of the networks may have trained
on them. The manifest's `source.checkpoint` is the first stage's (it names that split),
`source.stages` lists every stage's checkpoint and exits.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import UserError, run_cli
from common.manifest import Manifest
from common.provenance import git_commit
from export.pipeline import (
    DEFAULT_REPOSITORY,
    add_writer_arguments,
    batching_from_args,
    check_model_name,
    parse_exit_depths,
)
from export.triton_config import BatchingConfig

EXIT_LIST = re.compile(r"^\d+(\s*,\s*\d+)*$")


@dataclass(frozen=True)
class StageSpec:
    checkpoint: Path
    exits: str | None = None  # "15,25"; None = every exit of the checkpoint


def parse_stage(text: str) -> StageSpec:
    """`PATH` or `PATH:15,25` (a colon followed by anything but exit depths stays part of the path)."""
    path, colon, exits = text.rpartition(":")
    if colon and path and EXIT_LIST.match(exits.strip()):
        return StageSpec(Path(path), exits.strip())
    return StageSpec(Path(text))


def _check_compatible(metas, specs) -> None:
    first, first_path = metas[0], specs[0].checkpoint
    for meta, spec in zip(metas[1:], specs[1:]):
        problems = []
        if list(meta.classes) != list(first.classes):
            problems.append(f"classes {meta.classes} vs {first.classes}")
        if list(meta.input_size) != list(first.input_size):
            problems.append(f"input size {meta.input_size} vs {first.input_size}")
        if (list(meta.normalization.mean), list(meta.normalization.std)) != (
                list(first.normalization.mean), list(first.normalization.std)):
            problems.append("normalisation (mean/std): the gateway normalises a request once for every stage")
        split = (meta.heldout.seed, meta.heldout.size, meta.heldout.num_train)
        if split != (first.heldout.seed, first.heldout.size, first.heldout.num_train):
            problems.append(f"held-out split (seed, size, training images) {split} vs "
                            f"{(first.heldout.seed, first.heldout.size, first.heldout.num_train)}: one network "
                            f"may have trained on the images the cascade is validated and calibrated on")
        if problems:
            raise UserError(f"{spec.checkpoint} cannot follow {first_path} in one cascade: " + "; ".join(problems))


def compose_cascade(specs: list[StageSpec], name: str, output: Path = DEFAULT_REPOSITORY,
                    backend: str = "python", data: Path | None = None, validation_images: int = 1000,
                    tolerance: float = 1e-4, force: bool = False, batching: BatchingConfig = BatchingConfig(),
                    log=print) -> Manifest:
    """Export, validate and write the cascade of `specs` as model `name`; returns its manifest."""
    from common.checkpoint_meta import CheckpointExit, served_macs
    from export.onnx_export import ExportValidationError, export_and_validate
    from export.onnx_export import validation_images as heldout_images
    from export.repository import write_repository
    from training.checkpoint import load_checkpoint

    if len(specs) < 2:
        raise UserError("a composed cascade needs at least two --stage checkpoints (one network: export/to_onnx.py)")
    check_model_name(name, "--name")
    loaded = [load_checkpoint(spec.checkpoint) for spec in specs]
    metas = [meta for _, meta in loaded]
    _check_compatible(metas, specs)
    images = heldout_images(metas[0], data, validation_images)
    exported, exits, heldout_acc, stages = [], [], [], []
    depth_before = macs_before = params_before = 0  # what the earlier networks' served prefix costs
    for spec, (model, meta) in zip(specs, loaded):
        depths = parse_exit_depths(spec.exits, model.exit_depths)
        indices = sorted(model.exit_index(depth) for depth in depths)
        log(f"exporting {meta.model} ({spec.checkpoint}) exits {depths} as stages {len(exits) + 1}.."
            f"{len(exits) + len(indices)} of {name} ({len(images)} held-out validation images)")
        try:
            items = export_and_validate(model, images, indices, tolerance)
        except ExportValidationError as error:
            raise UserError(f"validation failed, nothing written: {error}") from None
        position = {index: len(exits) + k for k, index in enumerate(indices)}  # exit index in the cascade
        for item in items:
            kind = "exit" if item.kind == "exit" else "segment to exit"
            log(f"  {kind} {model.exits[item.exit_index].depth}: max abs error {item.max_abs_error:.2e}, "
                f"top-1 agreement {item.top1_agreement * 100:.2f}%")
            exported.append(replace(item, exit_index=position[item.exit_index]))
        through = served_macs(meta.exits, indices)  # this network's unserved heads are not run
        for index in indices:
            own = meta.exits[index]
            exits.append(CheckpointExit(
                index=position[index], depth=depth_before + own.depth, params=params_before + own.params,
                macs=macs_before + through[index],
                standalone_macs=own.macs if own.standalone_macs is None else own.standalone_macs))
            heldout_acc.append(meta.heldout_acc[index] if meta.heldout_acc else None)
        stages.append({"checkpoint": str(spec.checkpoint), "model": meta.model, "exits": depths,
                       "checkpoint_commit": meta.git_commit, "cascade_depths": [exits[position[i]].depth
                                                                                for i in indices]})
        last = meta.exits[indices[-1]]
        depth_before, macs_before, params_before = (depth_before + last.depth, macs_before + through[indices[-1]],
                                                    params_before + last.params)
    composed = metas[0].updated(model=name, exits=exits, heldout_acc=heldout_acc)
    source = {"checkpoint": str(specs[0].checkpoint), "stages": stages, "composed": True,
              "export_commit": git_commit(), "command": " ".join(sys.argv),
              "validation": {"images": len(images), "tolerance": tolerance,
                             "max_abs_error": max(item.max_abs_error for item in exported)}}
    manifest = write_repository(output, exported, composed, backend, batching, force, source, None, log, name)
    log(f"wrote {len(exported)} models, {name}_cascade and the manifest to {output}; "
        f"MACs through the cascade per exit: {', '.join(f'{e.depth}: {e.macs / 1e6:.1f} M' for e in exits)}")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.compose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="append", required=True, metavar="CHECKPOINT[:DEPTHS]",
                        help="a checkpoint (.safetensors with its .json) and, after a colon, the exit depths to "
                             "serve (as it names them, e.g. :15,25; default all); give it once per network, "
                             "cheapest first (at least two)")
    parser.add_argument("--name", required=True, help="the served model's name (its Triton models are named after it)")
    parser.add_argument("--model-repository", "--output", dest="output", type=Path, default=DEFAULT_REPOSITORY,
                        help=f"Triton model repository directory (default {DEFAULT_REPOSITORY})")
    add_writer_arguments(parser, backends=("python", "onnxruntime"))
    args = parser.parse_args(argv)
    compose_cascade([parse_stage(text) for text in args.stage], args.name, args.output, args.backend, args.data,
                    args.validation_images, args.tolerance, args.force, batching_from_args(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
