"""Average the weights of several checkpoints of one run (stochastic weight averaging).

    python -m training.train ... --schedule constant --lr 0.05 --snapshots --init-from BASE \\
        --output runs/swa/mwresnet56_5.safetensors
    python -m training.average runs/swa/mwresnet56_5.snapshots/epoch_0{10..30}.safetensors \\
        --output runs/swa/mwresnet56_5.avg.safetensors

Parameters are averaged; batch-norm statistics are not (the average of running
statistics does not describe the averaged weights), so they are recomputed with
one pass over the augmented training split, held-out images excluded. The
held-out accuracy of every exit is printed and recorded, so the epochs to
average can be chosen without touching the test split.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm import tqdm

from common.checkpoint_meta import CheckpointMeta
from common.errors import UserError, run_cli
from common.provenance import git_commit, utc_timestamp
from training.checkpoint import load_checkpoint, save_checkpoint, this_machine
from training.datasets import FORMATS, heldout_split, load_split_for_model
from training.evaluate import evaluate_exits
from training.models import MultiExitNet
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


def _identity(metadata: CheckpointMeta) -> tuple:
    return (metadata.model, metadata.num_classes, metadata.model_kwargs,
            metadata.heldout.seed, metadata.heldout.size, tuple(metadata.normalization.mean))


def average_weights(models: list[MultiExitNet]) -> MultiExitNet:
    """The mean of the models' parameters (buffers as in the last model: recompute batch norm)."""
    averaged = AveragedModel(models[0])
    for model in models:
        averaged.update_parameters(model)
    return averaged.module


def augmented_batches(images: np.ndarray, mean, std, batch_size: int, seed: int,
                      progress: bool = True) -> Iterator[torch.Tensor]:
    """One pass over `images` in a seeded random order, normalised and augmented as in training."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator).numpy()
    for start in tqdm(range(0, len(order), batch_size), desc="batch-norm statistics", disable=not progress):
        index = np.sort(order[start:start + batch_size])
        yield augment(to_normalized(images[index], mean, std), generator)


@torch.no_grad()
def recompute_batchnorm(model: MultiExitNet, images: np.ndarray, mean, std, batch_size: int,
                        seed: int, progress: bool = True) -> None:
    """Exact (cumulative) batch-norm statistics of `model` over augmented `images`."""
    update_bn(augmented_batches(images, mean, std, batch_size, seed, progress), model)
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

    train = load_split_for_model(first_meta.dataset_source(args.data), "train", first_meta.input_size, args.data_format)
    if tuple(train.classes) != tuple(first_meta.classes):
        raise UserError(f"dataset classes {list(train.classes)[:5]}... differ from the checkpoints'")
    train_idx, heldout_idx = heldout_split(len(train), first_meta.heldout.size, first_meta.heldout.seed)
    mean, std = first_meta.normalization.mean, first_meta.normalization.std
    recompute_batchnorm(model, train.images[train_idx], mean, std, args.batch_size, args.seed,
                        progress=not args.no_progress)
    heldout_acc = evaluate_exits(model, train.images[heldout_idx], train.labels[heldout_idx], mean, std,
                                 torch.device("cpu"))

    last_meta = loaded[-1][1]
    metadata = last_meta.updated(
        heldout_acc=heldout_acc, git_commit=git_commit(), machine=this_machine(), date=utc_timestamp(),
        extra={**last_meta.extra,
               "averaged_from": [{"path": str(path), "epochs_completed": meta.epochs_completed,
                                  "heldout_acc": meta.heldout_acc}
                                 for path, (_, meta) in zip(args.checkpoints, loaded)],
               "batchnorm_recomputed_on": {"images": len(train_idx), "augmented": True, "seed": args.seed}},
    )
    save_checkpoint(args.output, model, metadata)
    print(f"averaged {len(loaded)} checkpoints; held-out acc "
          + " ".join(f"{spec.depth}:{acc * 100:.2f}" for spec, acc in zip(model.exits, heldout_acc)))
    print(f"wrote {args.output} and {args.output.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
