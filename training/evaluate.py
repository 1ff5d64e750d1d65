"""Per-exit evaluation of a checkpoint on its held-out split and the test split.

    python -m training.evaluate --checkpoint checkpoints/mwresnet56_5.safetensors

Prints a table (depth, params, MACs, % of full MACs, held-out and test accuracy)
and writes it beside the checkpoint as `<stem>.eval.json` and `<stem>.eval.md`.
The held-out split is rebuilt from the seed and size recorded in the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, run_cli
from common.paths import DEFAULT_CHECKPOINT
from common.provenance import git_commit, utc_timestamp
from training.checkpoint import load_checkpoint, this_machine
from training.datasets import FORMATS, heldout_split, load_split_for_model
from training.models import MultiExitNet
from training.transforms import to_normalized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="a .safetensors checkpoint with its .json beside it (default: the reference one)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset (default: the source recorded in the checkpoint, else the shared CIFAR-10)")
    parser.add_argument("--data-format", choices=FORMATS, default="auto")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    return parser


def evaluate_exits(model: MultiExitNet, images: np.ndarray, labels: np.ndarray, mean, std,
                   device: torch.device, batch_size: int = 500) -> list[float]:
    """Top-1 accuracy of every exit on uint8 images."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(model.exits), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            batch = to_normalized(images[start:start + batch_size], mean, std).to(device)
            target = torch.as_tensor(labels[start:start + batch_size]).to(device)
            for index, logits in enumerate(model(batch)):
                correct[index] += (logits.argmax(1) == target).sum().cpu()
    model.train(was_training)
    return (correct.double() / max(1, len(labels))).tolist()


def evaluate_checkpoint(checkpoint: Path, data: Path | None = None, data_format: str = "auto",
                        batch_size: int = 500) -> dict:
    model, metadata = load_checkpoint(checkpoint)
    heldout = metadata.heldout
    source = metadata.dataset_source(data)
    train = load_split_for_model(source, "train", metadata.input_size, data_format)
    test = load_split_for_model(source, "test", metadata.input_size, data_format)
    if tuple(train.classes) != tuple(metadata.classes):
        raise UserError(f"dataset classes {list(train.classes)[:5]}... differ from the checkpoint's")
    _, heldout_idx = heldout_split(len(train), heldout.size, heldout.seed)
    mean, std = metadata.normalization.mean, metadata.normalization.std
    device = torch.device("cpu")
    heldout_acc = (evaluate_exits(model, train.images[heldout_idx], train.labels[heldout_idx], mean, std, device,
                                  batch_size) if len(heldout_idx) else [float("nan")] * len(model.exits))
    test_acc = evaluate_exits(model, test.images, test.labels, mean, std, device, batch_size)
    full_macs = model.exits[-1].standalone_macs or model.exits[-1].macs  # the network without early heads
    rows = [{"depth": spec.depth, "params": spec.params, "macs": spec.macs,
             "standalone_macs": spec.standalone_macs or spec.macs,
             "macs_fraction": round(spec.macs / full_macs, 4),
             "heldout_acc": round(h, 4), "test_acc": round(t, 4)}
            for spec, h, t in zip(model.exits, heldout_acc, test_acc)]
    return {
        "checkpoint": str(checkpoint), "model": metadata.model,
        "epochs_completed": metadata.epochs_completed, "epochs_planned": metadata.epochs_planned,
        "heldout": {"seed": heldout.seed, "size": len(heldout_idx)}, "test_size": len(test),
        "data": str(source), "exits": rows,
        "command": "python -m training.evaluate " + " ".join(sys.argv[1:]),
        "commit": git_commit(), "machine": this_machine(), "date": utc_timestamp(),
    }


def render_markdown(result: dict) -> str:
    lines = [
        f"# {result['model']}: per-exit accuracy",
        "",
        f"Checkpoint `{Path(result['checkpoint']).name}` after {result['epochs_completed']} of "
        f"{result['epochs_planned']} planned epochs; held-out: {result['heldout']['size']} training images "
        f"(seed {result['heldout']['seed']}); test: {result['test_size']} images.",
        "",
        "MACs: to reach the exit through the cascade (every earlier head included), as a % of the network "
        "without early exits; alone: the per-exit model.",
        "",
        "| exit depth | params (M) | MACs (M) | % of full MACs | MACs alone (M) | held-out acc (%) | test acc (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["exits"]:
        lines.append(f"| {row['depth']} | {row['params'] / 1e6:.3f} | {row['macs'] / 1e6:.1f} | "
                     f"{row['macs_fraction'] * 100:.1f} | {row.get('standalone_macs', row['macs']) / 1e6:.1f} | "
                     f"{row['heldout_acc'] * 100:.2f} | "
                     f"{row['test_acc'] * 100:.2f} |")
    lines += ["", f"Produced by `{result['command']}` at commit `{result['commit']}` on "
              f"{result['machine']}, {result['date']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.data_format, args.batch_size)
    markdown = render_markdown(result)
    print(markdown)
    stem = args.checkpoint.with_suffix("")
    Path(f"{stem}.eval.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.eval.md").write_text(markdown)
    print(f"wrote {stem}.eval.json and {stem}.eval.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
