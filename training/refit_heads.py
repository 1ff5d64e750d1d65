"""Refit the early exits' heads on a trained, frozen trunk: several head variants at once.

    python -m training.refit_heads --checkpoint checkpoints/mwresnet56_5.safetensors \\
        --variant linear-ce:head=linear --variant conv2-kd:head=conv2,kd=0.5,t=3 \\
        --epochs 20 --output-dir checkpoints/experiments/heads

The trunk and the final exit (weights and batch-norm statistics) stay exactly as
loaded, so the final exit's accuracy cannot move. The frozen trunk runs once over
`--views` augmented views of the training split and its activations are cached;
every epoch then trains every variant's heads on the cache (each image from one of
its views), so an ablation of N variants costs little more than one run. A variant is `name:key=value,...` with

- `head`: the early heads' kind (`linear`, `conv1`, `conv2`; see `training.models.make_head`);
- `kd`: weight of self-distillation from the final exit, in [0, 1]: the loss of each
  early exit is (1 - kd) * cross-entropy + kd * T^2 * KL(final || exit) at temperature
  `t` (the teacher is frozen, so it gets no gradient);
- `t`: the distillation temperature (default 3).

Each variant is written as a complete checkpoint `<output-dir>/<name>.safetensors`
(+ `.json` + `.log.jsonl`), which `training.evaluate` and the exporter take as they are.
Held-out accuracy per exit is printed after every epoch; the test split is not touched.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.checkpoint_meta import CheckpointMeta
from common.errors import UserError, run_cli
from training.checkpoint import build_metadata, load_checkpoint, save_checkpoint
from training.datasets import heldout_split, load_split_for_model
from training.losses import exit_distillation_loss
from training.models import HEADS, MultiExitNet, create_model
from training.transforms import augment, to_normalized


@dataclass(frozen=True)
class HeadVariant:
    name: str
    head: str = "linear"
    kd: float = 0.0
    t: float = 3.0

    @classmethod
    def parse(cls, text: str) -> HeadVariant:
        name, _, options = text.partition(":")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"--variant {text!r}: give name:key=value,... with a plain name")
        fields: dict = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key == "head":
                if value not in HEADS:
                    raise UserError(f"--variant {name}: unknown head {value!r}; known: {', '.join(HEADS)}")
                fields["head"] = value
            elif key in ("kd", "t"):
                try:
                    fields[key] = float(value)
                except ValueError:
                    raise UserError(f"--variant {name}: {key}={value!r} is not a number") from None
            else:
                raise UserError(f"--variant {name}: unknown option {key!r} (use head, kd, t)")
        variant = cls(name, **fields)
        if not 0.0 <= variant.kd <= 1.0 or variant.t <= 0:
            raise UserError(f"--variant {name}: kd must lie in [0, 1] and t be positive")
        return variant


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.refit_heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the trained multi-exit checkpoint")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:head=...,kd=...,t=...",
                        help="a head variant to train (repeat for several)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where each variant's checkpoint goes")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--cutout", type=int, default=0, help="Cutout square size (0 = off)")
    parser.add_argument("--views", type=int, default=2,
                        help="augmented views of each training image whose trunk activations are cached "
                             "(memory: about 74 KB per image and view for mwresnet56_5; default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off",
                        help="bf16 autocast for the frozen trunk's forward pass (CPU with AVX-512 BF16/AMX)")
    parser.add_argument("--limit-train", type=int, default=0, help="train on the first N images only (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


class FrozenTrunk:
    """The loaded model in eval mode: activations after every segment and the final logits."""

    def __init__(self, model: MultiExitNet, amp: bool) -> None:
        self.model = model.eval().requires_grad_(False)
        self.amp = amp

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            x = self.model.stem(images.contiguous(memory_format=torch.channels_last))
            features = []
            for segment in self.model.segments:
                x = segment(x)
                features.append(x)
            final = self.model.heads[-1](x)
        return [f.float() for f in features[:-1]], final.float()


def onecycle(step: int, total: int) -> float:
    """Linear warm-up from lr/25 over 15% of the steps, then cosine to zero."""
    progress = step / max(1, total)
    if progress < 0.15:
        return 0.04 + 0.96 * progress / 0.15
    return 0.5 * (1 + math.cos(math.pi * (progress - 0.15) / 0.85))


@torch.no_grad()
def heldout_features(trunk: FrozenTrunk, images: np.ndarray, mean, std,
                     batch_size: int = 500) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Float32 activations at the early exits and final logits of the held-out images, as evaluated."""
    amp, trunk.amp = trunk.amp, False  # held-out figures in float32, as `training.evaluate` measures them
    outputs = [trunk(to_normalized(images[start:start + batch_size], mean, std))
               for start in range(0, len(images), batch_size)]
    trunk.amp = amp
    features = [torch.cat([o[0][k] for o in outputs]) for k in range(len(outputs[0][0]))]
    return features, torch.cat([o[1] for o in outputs])


@torch.no_grad()
def heldout_accuracy(heads: dict[str, nn.ModuleList], features: list[torch.Tensor], final: torch.Tensor,
                     labels: torch.Tensor, batch_size: int = 500) -> dict[str, list[float]]:
    """Per-exit accuracy of every variant on the cached held-out activations."""
    final_acc = (final.argmax(1) == labels).double().mean().item()
    accuracy = {}
    for name, module in heads.items():
        module.eval()
        accuracy[name] = [sum((head(f[start:start + batch_size]).argmax(1) == labels[start:start + batch_size])
                              .sum().item() for start in range(0, len(labels), batch_size)) / len(labels)
                          for head, f in zip(module, features)] + [final_acc]
    return accuracy


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [HeadVariant.parse(text) for text in args.variant]
    if len({v.name for v in variants}) != len(variants):
        raise UserError("--variant names must differ")
    reference, metadata = load_checkpoint(args.checkpoint)
    trunk = FrozenTrunk(reference, amp=args.amp == "bf16")
    models = {v.name: create_model(metadata.model, num_classes=metadata.num_classes,
                                   **{**metadata.model_kwargs, "early_head": v.head}) for v in variants}
    heads = {name: nn.ModuleList(list(model.heads[:-1])) for name, model in models.items()}

    train = load_split_for_model(metadata.dataset_source(args.data), "train", metadata.input_size)
    train_idx, heldout_idx = heldout_split(len(train), metadata.heldout.size, metadata.heldout.seed)
    if args.limit_train:
        train_idx = np.sort(np.random.default_rng(args.seed).permutation(train_idx)[: args.limit_train])
    mean, std = metadata.normalization.mean, metadata.normalization.std
    train_images = torch.as_tensor(train.images[train_idx])
    train_labels = torch.as_tensor(train.labels[train_idx])
    heldout_images, heldout_labels = train.images[heldout_idx], train.labels[heldout_idx]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"refitting {len(variants)} head variants on the frozen trunk of {args.checkpoint}: "
          f"{len(train_labels)} train images x {args.views} augmented views, {len(heldout_idx)} held-out images")

    features, teacher, labels = cache_features(trunk, train_images, train_labels, mean, std, args)
    heldout_feats, heldout_final = heldout_features(trunk, heldout_images, mean, std)
    heldout_targets = torch.as_tensor(heldout_labels)
    parameters = [p for module in heads.values() for p in module.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: onecycle(s, steps_per_epoch * args.epochs))
    logs = {v.name: args.output_dir / f"{v.name}.log.jsonl" for v in variants}
    for log in logs.values():
        log.write_text("")
    history: dict[str, list] = {v.name: [] for v in variants}
    for epoch in range(args.epochs):
        started = time.time()
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        # Each image once per epoch, from one of its cached augmented views.
        order = torch.randperm(len(train_labels), generator=generator)
        view = torch.randint(0, args.views, (len(train_labels),), generator=generator)
        rows = view[order] * len(train_labels) + order
        for module in heads.values():
            module.train()
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                        disable=args.no_progress, dynamic_ncols=True)
        loss_sum = 0.0
        for step in progress:
            index = rows[step * args.batch_size:(step + 1) * args.batch_size]
            batch = [f[index].float() for f in features]
            # The heads train in float32: on CPU, bfloat16 autocast made their small convolutions slower.
            exit_logits = {v.name: [head(f) for head, f in zip(heads[v.name], batch)] for v in variants}
            loss = sum(exit_distillation_loss(exit_logits[v.name], teacher[index], labels[index], v.kd, v.t)
                       for v in variants)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            if step % 20 == 0:
                progress.set_postfix_str(f"loss {loss_sum / (step + 1) / len(variants):.3f}")
        accuracy = heldout_accuracy(heads, heldout_feats, heldout_final, heldout_targets)
        seconds = round(time.time() - started, 1)
        for v in variants:
            record = {"epoch": epoch + 1, "heldout_acc": accuracy[v.name], "lr": scheduler.get_last_lr()[0],
                      "seconds": seconds}
            history[v.name].append(record)
            with open(logs[v.name], "a") as log:
                log.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1} {v.name}: held-out acc "
                  + " ".join(f"{a * 100:.2f}" for a in accuracy[v.name]) + f" ({seconds}s)", flush=True)
            # A complete checkpoint per variant after every epoch.
            save_variant(models[v.name], reference, heads[v.name], v, metadata, args, history[v.name])
    return 0


def cache_features(trunk: FrozenTrunk, images: torch.Tensor, labels: torch.Tensor, mean, std,
                   args: argparse.Namespace) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The frozen trunk's activations at every early exit (bfloat16) and the final exit's logits for
    `args.views` augmented views of every training image, so the trunk runs once per view, not per epoch."""
    generator = torch.Generator().manual_seed(args.seed)
    count = len(labels)
    features: list[torch.Tensor] = []  # allocated at the first batch, filled in place (no second copy)
    teacher: torch.Tensor | None = None
    for view in range(args.views):
        for start in tqdm(range(0, count, 256), desc=f"trunk features, view {view + 1}/{args.views}",
                          disable=args.no_progress):
            batch = augment(to_normalized(images[start:start + 256], mean, std), generator, cutout=args.cutout)
            activations, final = trunk(batch)
            if teacher is None:
                features = [torch.empty((args.views * count, *a.shape[1:]), dtype=torch.bfloat16) for a in activations]
                teacher = torch.empty((args.views * count, final.shape[1]))
            rows = slice(view * count + start, view * count + start + len(final))
            for cache, a in zip(features, activations):
                cache[rows] = a
            teacher[rows] = final
    return features, teacher, labels.repeat(args.views)


def save_variant(model: MultiExitNet, reference: MultiExitNet, heads: nn.ModuleList, variant: HeadVariant,
                 metadata: CheckpointMeta, args: argparse.Namespace, history: list[dict]) -> None:
    """The reference's trunk and final head with the variant's early heads, as a checkpoint."""
    model.stem.load_state_dict(reference.stem.state_dict())
    model.segments.load_state_dict(reference.segments.state_dict())
    model.heads[-1].load_state_dict(reference.heads[-1].state_dict())
    for k, head in enumerate(heads):
        model.heads[k] = head
    model.eval()
    training = dict(metadata.training)
    training["model_kwargs"] = {**metadata.model_kwargs, "early_head": variant.head}
    training["head_refit"] = {"from": str(args.checkpoint), "variant": asdict(variant), "epochs": args.epochs,
                              "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
                              "cutout": args.cutout, "seed": args.seed}
    refit = build_metadata(model, classes=metadata.classes, mean=metadata.normalization.mean,
                           std=metadata.normalization.std, heldout=asdict(metadata.heldout), training=training,
                           heldout_acc=history[-1]["heldout_acc"], epochs_completed=len(history),
                           epochs_planned=args.epochs)
    save_checkpoint(args.output_dir / f"{variant.name}.safetensors", model, refit)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
