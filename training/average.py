"""Average the weights of several checkpoints of one run (stochastic weight averaging).

    python -m training.train ... --schedule constant --lr 0.05 --snapshots --init-from BASE
    python -m training.average checkpoints/swa/mwresnet56_5.snapshots/epoch_0{10..30}.safetensors \\
        --output checkpoints/swa/mwresnet56_5.avg.safetensors

Parameters are averaged; batch-norm statistics are not (the average of running
statistics does not describe the averaged weights), so they are recomputed with
one pass over the augmented training split, held-out images excluded. The
held-out accuracy of every exit is printed and recorded, so the epochs to
average can be chosen without touching the test split.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from training.checkpoint import git_commit, load_checkpoint, machine_description, save_checkpoint
from training.datasets import FORMATS, heldout_split, load_split
from training.evaluate import dataset_source
from training.models import MultiExitNet
from training.train import evaluate_exits
from training.transforms import augment, to_normalized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.average", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoints of the same model and split")
    parser.add_argument("--output", type=Path, required=True, help="where to write the averaged checkpoint")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset for the batch-norm pass (default: the one recorded in the checkpoints)")
    parser.add_argument("--data-format", choices=FORMATS, default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation in the batch-norm pass")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _identity(metadata: dict) -> tuple:
    held = metadata.get("heldout", {})
    return (metadata["model"], metadata["num_classes"], metadata.get("training", {}).get("model_kwargs"),
            held.get("seed"), held.get("size"), tuple(metadata["normalization"]["mean"]))


def average_weights(models: list[MultiExitNet]) -> MultiExitNet:
    """Mean of every floating-point parameter and buffer, into the first model."""
    target = models[0]
    states = [m.state_dict() for m in models]
    averaged = {}
    for name, value in states[0].items():
        if value.is_floating_point():
            averaged[name] = torch.stack([s[name] for s in states]).mean(0)
        else:
            averaged[name] = value
    target.load_state_dict(averaged)
    return target


@torch.no_grad()
def recompute_batchnorm(model: MultiExitNet, images: np.ndarray, mean, std, batch_size: int,
                        seed: int, progress: bool = True) -> None:
    """Exact (cumulative) batch-norm statistics of `model` over augmented `images`."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the pass
    model.train()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator).numpy()
    for start in tqdm(range(0, len(order), batch_size), desc="batch-norm statistics", disable=not progress):
        index = np.sort(order[start:start + batch_size])
        model(augment(to_normalized(images[index], mean, std), generator))
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.output.resolve() in {path.resolve() for path in args.checkpoints}:
        raise UserError("--output must not be one of the averaged checkpoints")
    loaded = [load_checkpoint(path) for path in args.checkpoints]
    first_meta = loaded[0][1]
    for path, (_, metadata) in zip(args.checkpoints, loaded):
        if _identity(metadata) != _identity(first_meta):
            raise UserError(f"{path} is not the same model, held-out split and normalisation as "
                            f"{args.checkpoints[0]}; only checkpoints of one run can be averaged")
    model = average_weights([m for m, _ in loaded])

    source = dataset_source(first_meta, args.data)
    train = load_split(source, "train", args.data_format)
    if tuple(train.classes) != tuple(first_meta["classes"]):
        raise UserError(f"dataset classes {list(train.classes)[:5]}... differ from the checkpoints'")
    held = first_meta["heldout"]
    train_idx, heldout_idx = heldout_split(len(train), held["size"], held["seed"])
    mean, std = first_meta["normalization"]["mean"], first_meta["normalization"]["std"]
    recompute_batchnorm(model, train.images[train_idx], mean, std, args.batch_size, args.seed,
                        progress=not args.no_progress)
    heldout_acc = evaluate_exits(model, train.images[heldout_idx], train.labels[heldout_idx], mean, std,
                                 torch.device("cpu"))

    metadata = dict(loaded[-1][1])
    metadata.update(
        heldout_acc=heldout_acc, git_commit=git_commit(), machine=machine_description(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        averaged_from=[{"path": str(path), "epochs_completed": meta.get("epochs_completed"),
                        "heldout_acc": meta.get("heldout_acc")}
                       for path, (_, meta) in zip(args.checkpoints, loaded)],
        batchnorm_recomputed_on={"images": len(train_idx), "augmented": True, "seed": args.seed},
    )
    save_checkpoint(args.output, model, metadata)
    print(f"averaged {len(loaded)} checkpoints; held-out acc "
          + " ".join(f"{spec.depth}:{acc * 100:.2f}" for spec, acc in zip(model.exits, heldout_acc)))
    print(f"wrote {args.output} and {args.output.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
