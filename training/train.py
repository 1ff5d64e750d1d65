"""Train a multi-exit network with multi-way back-propagation.

    python -m training.train --model mwresnet56_5 --epochs 30 --schedule onecycle
    torchrun --nproc_per_node 2 -m training.train ...   # data parallel (gloo/NCCL)

Every exit's cross-entropy is summed with per-exit weights (Multi-way BP); early
exits can also be distilled from the final exit. A checkpoint (safetensors +
JSON) is written atomically after every epoch, with a resume state beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from training.checkpoint import build_metadata, load_checkpoint, save_checkpoint, save_resume_state
from training.datasets import FORMATS, channel_stats, heldout_split, load_split
from training.losses import MultiExitLoss, parse_exit_weights
from training.models import MultiExitNet, create_model, list_models
from training.transforms import augment, to_normalized

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SCHEDULES = ("step", "cosine", "onecycle", "constant")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mwresnet56_5", help=f"registry entry: {', '.join(list_models())}")
    model.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=DEFAULT_DATA,
                      help="image-folder tree or .tar.gz, CIFAR pickles, or SVHN .mat (default: the shared CIFAR-10)")
    data.add_argument("--data-format", choices=FORMATS, default="auto")
    data.add_argument("--heldout-size", type=int, default=5000,
                      help="images carved from train/ for calibration, never trained on (default 5000)")
    data.add_argument("--heldout-seed", type=int, default=0, help="seed of the held-out split (recorded)")
    data.add_argument("--cutout", type=int, default=0, metavar="PIXELS",
                      help="Cutout augmentation: zero one PIXELS x PIXELS square per training image "
                           "(16 is the paper's size for CIFAR-10; default 0 = off)")
    data.add_argument("--limit-train", type=int, default=0, help="train on the first N images only (smoke runs)")
    optim = parser.add_argument_group("optimisation (SGD with Nesterov momentum)")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--batch-size", type=int, default=128, help="per process")
    optim.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=5e-4)
    optim.add_argument("--schedule", choices=SCHEDULES, default="onecycle",
                       help="step: lr/10 at 50%% and 75%% (the paper's, for long runs); "
                            "cosine or onecycle (warm-up then cosine) for short runs; constant: a fixed lr, "
                            "for weight averaging (--snapshots, then python -m training.average)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--exit-weights", default=None,
                      help="per-exit cross-entropy weights, e.g. 1,1,1,1,1 (default all 1)")
    loss.add_argument("--distill-weight", type=float, default=0.0,
                      help="self-distillation of early exits from the final exit (0 = off)")
    loss.add_argument("--head-grad-scale", type=float, default=1.0,
                      help="scale of the gradient the early exits' heads send into the shared trunk "
                           "(1 = Multi-way BP, the default; 0 = trunk trained by the final exit only, "
                           "early heads on detached features)")
    loss.add_argument("--freeze-trunk", action="store_true",
                      help="train only the early exits' heads; the trunk and the final exit (weights and "
                           "batch-norm statistics) stay as loaded. With --init-from: refit the early heads "
                           "to a trunk that changed, e.g. after weight averaging")
    loss.add_argument("--temperature", type=float, default=3.0, help="distillation temperature")
    run = parser.add_argument_group("run")
    run.add_argument("--output", type=Path, default=None,
                     help="checkpoint path (default checkpoints/<model>.safetensors)")
    run.add_argument("--resume", action="store_true", help="continue from <output>.resume.pt")
    run.add_argument("--stop-after", type=int, default=0,
                     help="stop after this many epochs of the schedule (resume later with --resume)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    run.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                     help="channels-last memory format (auto: on for CUDA)")
    run.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                     help="mixed precision (auto: bf16 or fp16 on CUDA, off on CPU; bf16 on a CPU with "
                          "AVX-512 BF16/AMX trains ~1.6x faster)")
    run.add_argument("--init-from", type=Path, default=None,
                     help="start from this checkpoint's weights with a fresh optimiser and schedule "
                          "(recorded in the checkpoint)")
    run.add_argument("--snapshots", action="store_true",
                     help="also keep every epoch's weights in <output stem>.snapshots/ (for training.average)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def lr_multiplier(schedule: str, step: int, total_steps: int) -> float:
    progress = step / max(1, total_steps)
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    warmup = 0.15  # onecycle: linear warm-up from lr/25, then cosine to ~0
    if progress < warmup:
        return 0.04 + 0.96 * progress / warmup
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


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


def snapshot_path(output: Path, epoch: int) -> Path:
    return output.parent / f"{output.stem}.snapshots" / f"epoch_{epoch:03d}.safetensors"


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = self._pick_device()
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        if args.model not in list_models():  # before the data, which takes a while to load
            create_model(args.model)
        self.amp_dtype = self._amp_dtype()  # before the data, so a bad --amp fails at once
        torch.manual_seed(args.seed)
        self.output = args.output or REPO_ROOT / "checkpoints" / f"{args.model}.safetensors"
        self.resume_file = self.output.with_suffix(".resume.pt")
        self.log_file = self.output.with_suffix(".log.jsonl")
        self._load_data()
        self.model = create_model(args.model, num_classes=len(self.classes), width=args.width)
        self.model.head_grad_scale = args.head_grad_scale
        self.model.to(self.device)
        self.channels_last = args.channels_last == "on" or (
            args.channels_last == "auto" and self.device.type == "cuda")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss = MultiExitLoss(parse_exit_weights(args.exit_weights, len(self.model.exits)),
                                  args.distill_weight, args.temperature)
        if args.freeze_trunk:
            self.model.requires_grad_(False)
            for head in self.model.heads[:-1]:
                head.requires_grad_(True)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay, nesterov=True)
        self.steps_per_epoch = math.ceil(len(self.train_labels) / (args.batch_size * self.world))
        total = self.steps_per_epoch * args.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(args.schedule, step, total))
        self.start_epoch = 0
        self.history: list[dict] = []
        self.init_meta = None
        if args.resume:
            self._resume()
        elif args.init_from:
            self._init_from(args.init_from)
        self.network = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        amp_dtype = self.amp_dtype
        device_type = self.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.args.amp
        if amp == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp == "fp16" and self.device.type != "cuda":
            raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def _pick_device(self) -> torch.device:
        requested = self.args.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("--device cuda requested but no CUDA device is available")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        return torch.device("cpu")

    def _load_data(self) -> None:
        args = self.args
        train = load_split(args.data, "train", args.data_format)
        self.classes = train.classes
        train_idx, heldout_idx = heldout_split(len(train), args.heldout_size, args.heldout_seed)
        if args.limit_train:  # a random subset, so every class stays represented
            rng = np.random.default_rng(args.seed)
            train_idx = np.sort(rng.permutation(train_idx)[: args.limit_train])
        self.mean, self.std = channel_stats(train.images[train_idx])
        self.heldout_images, self.heldout_labels = train.images[heldout_idx], train.labels[heldout_idx]
        # The whole uint8 training set lives on the device: batches are slices of it.
        self.train_images = torch.as_tensor(train.images[train_idx]).to(self.device)
        self.train_labels = torch.as_tensor(train.labels[train_idx]).to(self.device)
        self.heldout_meta = {"seed": args.heldout_seed, "size": args.heldout_size,
                             "source": str(args.data), "num_train": len(train)}

    def _resume(self) -> None:
        if not self.resume_file.exists():
            raise UserError(f"--resume given but {self.resume_file} does not exist")
        state = torch.load(self.resume_file, map_location=self.device, weights_only=False)
        if state["model_name"] != self.args.model:
            raise UserError(f"{self.resume_file} is for {state['model_name']}, not {self.args.model}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = state["epoch"]
        self.history = state["history"]
        self.init_meta = state.get("init_from")
        if self.rank == 0:
            print(f"resumed from {self.resume_file} after epoch {self.start_epoch}")

    def _init_from(self, path: Path) -> None:
        source, meta = load_checkpoint(path)
        width = meta.get("training", {}).get("model_kwargs", {}).get("width", 16)
        if (meta["model"], meta["num_classes"], width) != (self.args.model, len(self.classes), self.args.width):
            raise UserError(f"--init-from {path} holds {meta['model']} (width {width}, {meta['num_classes']} classes), "
                            f"not {self.args.model} (width {self.args.width}, {len(self.classes)} classes)")
        held = meta.get("heldout", {})
        if (held.get("seed"), held.get("size")) != (self.args.heldout_seed, self.args.heldout_size):
            raise UserError(f"--init-from {path} was trained with another held-out split; "
                            "its held-out images would not be held out")
        self.model.load_state_dict(source.state_dict())
        self.init_meta = {"path": str(path), "epochs_completed": meta.get("epochs_completed"),
                          "schedule": meta.get("training", {}).get("schedule"), "date": meta.get("date")}
        if self.rank == 0:
            print(f"initialised from {path} ({meta.get('epochs_completed')} epochs)")

    def training_config(self) -> dict:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}
        config.update(exit_weights=list(self.loss.exit_weights), world_size=self.world,
                      model_kwargs={"width": self.args.width}, device=str(self.device),
                      init_from=self.init_meta)
        return config

    def train_epoch(self, epoch: int) -> dict:
        args = self.args
        generator = torch.Generator(device=self.device).manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_labels), generator=generator, device=self.device)
        order = order[self.rank :: self.world]
        self.model.train()
        if args.freeze_trunk:  # frozen parts keep their batch-norm statistics too
            for module in (self.model.stem, *self.model.segments, self.model.heads[-1]):
                module.eval()
        num_exits = len(self.model.exits)
        loss_sum, seen = 0.0, 0
        correct = torch.zeros(num_exits, device=self.device)
        progress = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                        disable=args.no_progress or self.rank != 0, dynamic_ncols=True)
        for step in progress:
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            if len(index) == 0:
                break
            batch = to_normalized(self.train_images[index], self.mean, self.std)
            batch = augment(batch.to(self.device), generator, cutout=args.cutout)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            target = self.train_labels[index]
            with self.autocast():
                logits = self.network(batch)
                loss = self.loss(logits, target)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            with torch.no_grad():
                for k, out in enumerate(logits):
                    correct[k] += (out.argmax(1) == target).sum()
            loss_sum += loss.item() * len(index)
            seen += len(index)
            if step % 10 == 0 or step == self.steps_per_epoch - 1:
                accs = (correct / seen * 100).tolist()
                progress.set_postfix_str(f"loss {loss_sum / seen:.3f} acc " + "/".join(f"{a:.0f}" for a in accs))
        return {"train_loss": loss_sum / max(1, seen),
                "train_acc": (correct / max(1, seen)).tolist(),
                "lr": self.scheduler.get_last_lr()[0]}

    def run(self) -> None:
        args = self.args
        if self.rank == 0:
            depths = ", ".join(f"{e.depth} ({e.params / 1e6:.3f} M, {e.macs / 1e6:.1f} MMAC)" for e in self.model.exits)
            print(f"{args.model}: {len(self.train_labels)} train / {len(self.heldout_labels)} held-out images "
                  f"on {self.device} x{self.world}; exits {depths}")
        last_epoch = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
        for epoch in range(self.start_epoch, last_epoch):
            started = time.time()
            stats = self.train_epoch(epoch)
            if self.rank == 0:
                heldout_acc = evaluate_exits(self.model, self.heldout_images, self.heldout_labels,
                                             self.mean, self.std, self.device)
                record = {"epoch": epoch + 1, **stats, "heldout_acc": heldout_acc,
                          "seconds": round(time.time() - started, 1)}
                self.history.append(record)
                self._save(epoch + 1, heldout_acc)
                print(f"epoch {epoch + 1}: loss {stats['train_loss']:.3f} held-out acc "
                      + " ".join(f"{d}:{a * 100:.2f}" for d, a in zip(self.model.exit_depths, heldout_acc))
                      + f" ({record['seconds']}s)", flush=True)
            if self.world > 1:
                torch.distributed.barrier()
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def _save(self, epochs_done: int, heldout_acc: list[float]) -> None:
        metadata = build_metadata(
            self.model, classes=self.classes, mean=self.mean, std=self.std, heldout=self.heldout_meta,
            training=self.training_config(),
            extra={"epochs_completed": epochs_done, "epochs_planned": self.args.epochs,
                   "heldout_acc": heldout_acc},
        )
        was_cl = self.channels_last
        if was_cl:
            self.model.to(memory_format=torch.contiguous_format)
        save_checkpoint(self.output, self.model, metadata)
        if self.args.snapshots:
            save_checkpoint(snapshot_path(self.output, epochs_done), self.model, metadata)
        save_resume_state(self.resume_file, {
            "model_name": self.args.model, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epochs_done, "history": self.history, "init_from": self.init_meta,
        })
        if was_cl:
            self.model.to(memory_format=torch.channels_last)
        with open(self.log_file, "a") as log:
            log.write(json.dumps(self.history[-1]) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be positive")
    if args.cutout < 0:
        raise UserError("--cutout must be 0 (off) or a square size in pixels")
    if args.freeze_trunk and not (args.init_from or args.resume):
        raise UserError("--freeze-trunk needs trained weights: give --init-from (or --resume)")
    if not 0.0 <= args.head_grad_scale <= 1.0:
        raise UserError("--head-grad-scale must be between 0 and 1")
    Trainer(args).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
