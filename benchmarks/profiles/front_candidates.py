"""CPU time per MAC of candidate front networks' segments, before training any of them.

    taskset -c 0 .venv/bin/python benchmarks/profiles/front_candidates.py \
        --candidate mwresnet20_3:16 --candidate mwresnet8_3:32 --output /tmp/candidates

Each candidate (`registry entry:width`) gets random weights with batch-norm statistics from one
train-mode pass over 512 training images, is exported like any checkpoint (`export.pipeline`, every
exit, ONNX Runtime segments) into its own repository under `--output`, and profiled there with
`export.profile` (one thread, the gateway's session options) at `--batch`. One line per segment:
its MACs, its median time per image and the time per MMAC. Accuracy needs training: this says only
what each layer shape costs on this CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.paths import DEFAULT_DATA
from export.pipeline import ExportOptions, export_checkpoint
from export.profile import profile_repository
from training.checkpoint import build_metadata, save_checkpoint
from training.datasets import channel_stats, load_split
from training.models import create_model
from training.transforms import to_normalized


def candidate_lines(name: str, manifest: dict, batch: int) -> list[str]:
    lines, previous = [], 0
    for entry in manifest["exits"]:
        macs = entry["macs"] - previous
        previous = entry["macs"]
        per_image_us = entry["latency_ms"]["segment_model"][str(batch)] * 1000 / batch
        lines.append(f"{name} exit {entry['depth']}: segment {macs / 1e6:.1f} MMAC ({entry['macs'] / 1e6:.1f} "
                     f"cumulative), {per_image_us:.0f} us an image at batch {batch}, "
                     f"{per_image_us / (macs / 1e6):.1f} us/MMAC")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", required=True, metavar="ENTRY:WIDTH")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, required=True, help="a folder for the checkpoints and repositories")
    args = parser.parse_args(argv)
    train = load_split(args.data, "train")
    mean, std = channel_stats(train.images)
    for candidate in args.candidate:
        entry, width = candidate.rsplit(":", 1)
        name = f"{entry}_w{width}"
        torch.manual_seed(0)
        network = create_model(entry, num_classes=len(train.classes), width=int(width))
        network.train()
        with torch.no_grad():  # batch-norm statistics of real images
            network(to_normalized(train.images[:512], mean, std))
        network.eval()
        checkpoint = args.output / f"{name}.safetensors"
        meta = build_metadata(network, classes=train.classes, mean=mean, std=std,
                              heldout={"seed": 0, "size": min(5000, len(train) // 4), "source": str(args.data),
                                       "num_train": len(train)},
                              training={"model_kwargs": {"width": int(width)}},
                              heldout_acc=[0.0] * len(network.exits))
        save_checkpoint(checkpoint, network, meta)
        repository = args.output / f"repository-{name}"
        export_checkpoint(ExportOptions(checkpoint=checkpoint, output=repository, validation_images=30,
                                        data=args.data, model_name=name, force=True), log=lambda message: None)
        result = profile_repository(repository, [args.batch], 1, args.repeats, show_progress=False, model=name)
        for line in candidate_lines(name, json.loads(Path(result["manifest"]).read_text()), args.batch):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
