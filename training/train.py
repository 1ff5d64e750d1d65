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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from common.paths import DEFAULT_DATA, REPO_ROOT
from training.attach import takes_pretrained
from training.checkpoint import (
    build_metadata,
    load_checkpoint,
    save_checkpoint,
    save_resume_state,
    snapshot_path,
)
from training.cotrain import DEFAULT_AGREEMENT_WEIGHT, DEFAULT_WARMUP_EPOCHS, AnytimeEnsemble, CoTrainingLoss
from training.datasets import CHANNELS, FORMATS, channel_stats, heldout_split, load_split
from training.evaluate import evaluate_exits
from training.losses import MultiExitLoss, parse_exit_weights
from training.models import HEADS, create_model, list_models
from training.schedules import SCHEDULES, build_scheduler, fast_forward
from training.transforms import augment, to_normalized


@dataclass(frozen=True)
class TrainConfig:
    """One training run, as the command line describes it (field names are the flags')."""

    # model
    model: str = "mwresnet56_5"
    width: int = 16
    early_head: str = "linear"
    conv: str = "standard"  # cheap convolutions: group:G, depthwise, shift (training/cheap_conv.py)
    dropout: float = 0.0  # wide ResNets (mwwrn*): dropout between a block's convolutions
    # data
    data: Path = DEFAULT_DATA
    data_format: str = "auto"
    image_size: int | None = None  # None: the data's own size
    channels: int | None = None  # None: from the data (1 if every image is grayscale, else 3)
    heldout_size: int = 5000
    heldout_seed: int = 0
    cutout: int = 0
    limit_train: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 128  # per process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    # loss
    exit_weights: str | None = None
    distill_weight: float = 0.0
    head_grad_scale: float = 1.0
    freeze_trunk: bool = False
    freeze_backbone: bool = False
    temperature: float = 3.0
    online_distill: int = 0  # K students + an online teacher (training/online_distill.py); 0 = off
    od_temperature: float = 3.0  # defaults: training/online_distill.py's DEFAULT_*
    od_student_weight: float = 1.0
    od_teacher_weight: float = 1.0
    agreement_weight: float = DEFAULT_AGREEMENT_WEIGHT  # co-training (<entry>_split<S> models)
    agreement_warmup: int = DEFAULT_WARMUP_EPOCHS
    # run
    output: Path | None = None  # None: checkpoints/<model>.safetensors
    resume: bool = False
    stop_after: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    channels_last: str = "auto"
    amp: str = "auto"
    init_from: Path | None = None
    pretrained: Path | None = None
    snapshots: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be positive")
        if self.cutout < 0:
            raise UserError("--cutout must be 0 (off) or a square size in pixels")
        if self.freeze_trunk and not (self.init_from or self.resume):
            raise UserError("--freeze-trunk needs trained weights: give --init-from (or --resume)")
        if self.freeze_trunk and self.freeze_backbone:
            raise UserError("--freeze-trunk and --freeze-backbone are alternatives: the first also keeps the "
                            "final exit as loaded, the second trains every exit head")
        if self.pretrained and self.init_from:
            raise UserError("--pretrained loads a backbone's weights, --init-from a multi-exit checkpoint: give one")
        if self.image_size is not None and self.image_size < 1:
            raise UserError("--image-size must be positive")
        if not 0.0 <= self.head_grad_scale <= 1.0:
            raise UserError("--head-grad-scale must be between 0 and 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")

    @property
    def checkpoint_path(self) -> Path:
        return self.output or REPO_ROOT / "checkpoints" / f"{self.model}.safetensors"

    @property
    def model_kwargs(self) -> dict:
        kwargs: dict = {"width": self.width}
        if self.early_head != "linear":
            kwargs["early_head"] = self.early_head
        if self.conv != "standard":
            kwargs["conv"] = self.conv
        if self.dropout:
            kwargs["dropout"] = self.dropout
        return kwargs

    @property
    def last_epoch(self) -> int:
        """The epoch this run stops after (--stop-after cuts the schedule short)."""
        return min(self.epochs, self.stop_after) if self.stop_after else self.epochs

    def record(self) -> dict:
        """The configuration as JSON values (paths as strings), keyed by flag name."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"registry entry: {', '.join(list_models())}")
    model.add_argument("--width", type=int, help="channels of the first stage (default 16)")
    model.add_argument("--early-head", choices=HEADS,
                       help="the early exits' heads: linear (the paper's BN-ReLU-pool-FC, the default) or conv1/"
                            "conv2 (one or two 3x3 convolutions and mixed pooling first; their MACs count)")
    model.add_argument("--conv", metavar="KIND",
                       help="cheap-convolution student: swap the 3x3 convolutions (not the stem's) for group:G, "
                            "depthwise (separable) or shift (+ 1x1; the shift costs no MACs); default standard")
    model.add_argument("--dropout", type=float, help="wide ResNets (mwwrn*): dropout between a block's convolutions")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path,
                      help="image-folder tree or .tar.gz, CIFAR pickles, or SVHN .mat (default: the shared CIFAR-10)")
    data.add_argument("--data-format", choices=FORMATS)
    data.add_argument("--image-size", type=int, metavar="PIXELS",
                      help="resize every image to PIXELS x PIXELS (default: the data's own size, which all images "
                           "must share)")
    data.add_argument("--channels", type=int, choices=CHANNELS,
                      help="1 (grayscale) or 3 (RGB) (default: from the data, 1 if every image is grayscale)")
    data.add_argument("--heldout-size", type=int,
                      help="images carved from train/ for calibration, never trained on (default 5000)")
    data.add_argument("--heldout-seed", type=int, help="seed of the held-out split (recorded)")
    data.add_argument("--cutout", type=int, metavar="PIXELS",
                      help="Cutout augmentation: zero one PIXELS x PIXELS square per training image "
                           "(16 is the paper's size for CIFAR-10; default 0 = off)")
    data.add_argument("--limit-train", type=int, help="train on the first N images only (smoke runs)")
    optim = parser.add_argument_group("optimisation (SGD with Nesterov momentum)")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int, help="per process")
    optim.add_argument("--lr", type=float, help="peak learning rate")
    optim.add_argument("--momentum", type=float)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--schedule", choices=SCHEDULES,
                       help="step: lr/10 at 50%% and 75%% (the paper's, for long runs); "
                            "cosine or onecycle (warm-up then cosine) for short runs; constant: a fixed lr, "
                            "for weight averaging (--snapshots, then python -m training.average)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--exit-weights",
                      help="per-exit cross-entropy weights, e.g. 1,1,1,1,1 (default all 1)")
    loss.add_argument("--distill-weight", type=float,
                      help="self-distillation of early exits from the final exit (0 = off)")
    loss.add_argument("--head-grad-scale", type=float,
                      help="scale of the gradient the early exits' heads send into the shared trunk "
                           "(1 = Multi-way BP, the default; 0 = trunk trained by the final exit only, "
                           "early heads on detached features)")
    loss.add_argument("--freeze-trunk", action="store_true",
                      help="train only the early exits' heads; the trunk and the final exit (weights and "
                           "batch-norm statistics) stay as loaded. With --init-from: refit the early heads "
                           "to a trunk that changed, e.g. after weight averaging")
    loss.add_argument("--freeze-backbone", action="store_true",
                      help="train only the exit heads, every exit's: the stem and segments (weights and batch-norm "
                           "statistics) stay as built or loaded, e.g. a --pretrained backbone")
    loss.add_argument("--temperature", type=float, help="distillation temperature")
    loss.add_argument("--agreement-weight", type=float,
                      help="co-training of a <entry>_split<S> model: weight of the members' Jensen-Shannon "
                           "agreement term (default %(default)s)")
    loss.add_argument("--agreement-warmup", type=int, metavar="EPOCHS",
                      help="epochs over which the agreement weight rises linearly from 0 (default %(default)s)")
    loss.add_argument("--online-distill", type=int, metavar="K",
                      help="online distillation: train K students and an online teacher (a classifier on their "
                           "concatenated features) with mutual KL; the checkpoint keeps the best student on held-out")
    loss.add_argument("--od-temperature", type=float, help="online distillation temperature (default %(default)s)")
    loss.add_argument("--od-student-weight", type=float,
                      help="weight of KL(teacher || student) (default %(default)s)")
    loss.add_argument("--od-teacher-weight", type=float,
                      help="weight of KL(student || teacher), averaged over students (default %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--output", type=Path,
                     help="checkpoint path (default checkpoints/<model>.safetensors)")
    run.add_argument("--resume", action="store_true", help="continue from <output>.resume.pt")
    run.add_argument("--stop-after", type=int,
                     help="stop after this many epochs of the schedule (resume later with --resume)")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto, cpu or cuda")
    run.add_argument("--threads", type=int, help="CPU threads (0 = torch default)")
    run.add_argument("--channels-last", choices=("auto", "on", "off"),
                     help="channels-last memory format (auto: on for CUDA)")
    run.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                     help="mixed precision (auto: bf16 or fp16 on CUDA, off on CPU; bf16 on a CPU with "
                          "AVX-512 BF16/AMX trains ~1.6x faster)")
    run.add_argument("--init-from", type=Path,
                     help="start from this checkpoint's weights with a fresh optimiser and schedule "
                          "(recorded in the checkpoint)")
    run.add_argument("--pretrained", type=Path, metavar="PATH",
                     help="a backbone entry's (tv_*, timm_*) pre-trained weights: a local state dict (.pth/.pt or "
                          ".safetensors) of the original network, loaded before the exits are attached (nothing is "
                          "downloaded)")
    run.add_argument("--snapshots", action="store_true",
                     help="also keep every epoch's weights in <output stem>.snapshots/ (for training.average)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Defaults live in TrainConfig; the parser only names and explains them.
    parser.set_defaults(**{key: getattr(DEFAULTS, key) for key in asdict(DEFAULTS)})
    return parser


class Trainer:
    """The training loop of one run: data, model, optimiser and schedule, then epochs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._join_processes()
        self._check_choices()  # before the data, which takes a while to load
        self._name_files()
        self._load_data()
        self._build_model()
        self._build_optimisation()
        self._restore_state()
        self._prepare_steps()

    def _join_processes(self) -> None:
        """Rank and world size (torchrun sets them), the device, the process group."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = self._pick_device()
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def _check_choices(self) -> None:
        if self.config.model not in list_models():
            create_model(self.config.model)  # raises the error that lists the known models
        if self.config.pretrained and not takes_pretrained(self.config.model):
            raise UserError(f"--pretrained loads a backbone's weights into an entry built over one (tv_*, timm_*, "
                            f"or yours with a `pretrained` parameter); {self.config.model} has none: use --init-from "
                            "for a multi-exit checkpoint")
        self.amp_dtype = self._amp_dtype()

    def _name_files(self) -> None:
        self.output = self.config.checkpoint_path
        self.resume_file = self.output.with_suffix(".resume.pt")
        self.log_file = self.output.with_suffix(".log.jsonl")

    def _build_model(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        pretrained = {"pretrained": config.pretrained} if config.pretrained else {}
        self.model = create_model(config.model, num_classes=len(self.classes), input_size=self.input_size,
                                  **config.model_kwargs, **pretrained)
        self.model.head_grad_scale = config.head_grad_scale
        self.model.to(self.device)
        self.channels_last = config.channels_last == "on" or (
            config.channels_last == "auto" and self.device.type == "cuda")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.freeze_trunk:
            self.model.requires_grad_(False)
            for head in self.model.heads[:-1]:
                head.requires_grad_(True)
        if config.freeze_backbone:
            self.model.requires_grad_(False)
            self.model.heads.requires_grad_(True)
        self.loss = MultiExitLoss(parse_exit_weights(config.exit_weights, len(self.model.exits)),
                                  config.distill_weight, config.temperature)
        # Co-trained members (divide and co-train) learn from their own logits, not the ensemble exits.
        self.cotrain = CoTrainingLoss(config.agreement_weight, config.agreement_warmup) \
            if isinstance(self.model, AnytimeEnsemble) else None
        if self.cotrain is not None and self.world > 1:
            raise UserError("co-training a _split model runs in one process (no DDP yet)")

    def _build_optimisation(self) -> None:
        config = self.config
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, nesterov=True)
        self.steps_per_epoch = math.ceil(len(self.train_labels) / (config.batch_size * self.world))
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.steps_per_epoch * config.epochs)

    def _restore_state(self) -> None:
        self.start_epoch = 0
        self.history: list[dict] = []
        self.init_meta = None
        if self.config.resume:
            self._resume()
        elif self.config.init_from:
            self._init_from(self.config.init_from)

    def _prepare_steps(self) -> None:
        """Data parallelism, mixed precision and its gradient scaler."""
        self.network = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        amp_dtype = self.amp_dtype
        device_type = self.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp == "fp16" and self.device.type != "cuda":
            raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def _pick_device(self) -> torch.device:
        requested = self.config.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("--device cuda requested but no CUDA device is available")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        return torch.device("cpu")

    def _load_data(self) -> None:
        config = self.config
        train = load_split(config.data, "train", config.data_format, image_size=config.image_size,
                           channels=config.channels)
        self.classes = train.classes
        self.input_size = train.input_size  # (C, H, W) from the data unless --image-size/--channels say otherwise
        train_idx, heldout_idx = heldout_split(len(train), config.heldout_size, config.heldout_seed)
        if config.limit_train:  # a random subset, so every class stays represented
            rng = np.random.default_rng(config.seed)
            train_idx = np.sort(rng.permutation(train_idx)[: config.limit_train])
        self.mean, self.std = channel_stats(train.images[train_idx])
        self.heldout_images, self.heldout_labels = train.images[heldout_idx], train.labels[heldout_idx]
        # The whole uint8 training set lives on the device: batches are slices of it.
        self.train_images = torch.as_tensor(train.images[train_idx]).to(self.device)
        self.train_labels = torch.as_tensor(train.labels[train_idx]).to(self.device)
        self.heldout_meta = {"seed": config.heldout_seed, "size": config.heldout_size,
                             "source": str(config.data), "num_train": len(train)}

    def _resume(self) -> None:
        if not self.resume_file.exists():
            raise UserError(f"--resume given but {self.resume_file} does not exist")
        state = torch.load(self.resume_file, map_location=self.device, weights_only=False)
        if state["model_name"] != self.config.model:
            raise UserError(f"{self.resume_file} is for {state['model_name']}, not {self.config.model}")
        self.model.load_state_dict(state["model"])
        if "lr_lambdas" in state["scheduler"]:  # written when the schedule was a LambdaLR
            fast_forward(self.scheduler, state["scheduler"]["last_epoch"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = state["epoch"]
        self.history = state["history"]
        self.init_meta = state.get("init_from")
        if self.rank == 0:
            print(f"resumed from {self.resume_file} after epoch {self.start_epoch}")

    def _init_from(self, path: Path) -> None:
        config = self.config
        source, meta = load_checkpoint(path)
        if tuple(meta.input_size) != tuple(self.input_size):
            raise UserError(f"--init-from {path} takes inputs of {meta.input_size} (C, H, W), the data here "
                            f"{list(self.input_size)}: give --image-size/--channels to match")
        width, head = meta.model_kwargs.get("width", 16), meta.model_kwargs.get("early_head", "linear")
        if (meta.model, meta.num_classes, width, head) != (config.model, len(self.classes), config.width,
                                                           config.early_head):
            raise UserError(f"--init-from {path} holds {meta.model} (width {width}, {meta.num_classes} classes, "
                            f"{head} early heads), not {config.model} (width {config.width}, "
                            f"{len(self.classes)} classes, {config.early_head} early heads)")
        if (meta.heldout.seed, meta.heldout.size) != (config.heldout_seed, config.heldout_size):
            raise UserError(f"--init-from {path} was trained with another held-out split; "
                            "its held-out images would not be held out")
        self.model.load_state_dict(source.state_dict())
        self.init_meta = {"path": str(path), "epochs_completed": meta.epochs_completed,
                          "schedule": meta.training.get("schedule"), "date": meta.date}
        if self.rank == 0:
            print(f"initialised from {path} ({meta.epochs_completed} epochs)")

    def training_config(self) -> dict:
        """What the checkpoint records about this run: the flags, and what they resolved to."""
        config = self.config.record()
        config.update(exit_weights=list(self.loss.exit_weights), world_size=self.world,
                      model_kwargs=self.config.model_kwargs, device=str(self.device),
                      init_from=self.init_meta)
        return config

    def train_epoch(self, epoch: int) -> dict:
        config = self.config
        generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_labels), generator=generator, device=self.device)
        order = order[self.rank :: self.world]
        self.model.train()
        if config.freeze_trunk:  # frozen parts keep their batch-norm statistics too
            for module in (self.model.stem, *self.model.segments, self.model.heads[-1]):
                module.eval()
        if config.freeze_backbone:
            for module in (self.model.stem, *self.model.segments):
                module.eval()
        num_exits = len(self.model.exits)
        loss_sum, seen = 0.0, 0
        correct = torch.zeros(num_exits, device=self.device)
        progress = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                        disable=config.no_progress or self.rank != 0, dynamic_ncols=True)
        for step in progress:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) == 0:
                break
            clean = to_normalized(self.train_images[index], self.mean, self.std).to(self.device)
            batch = augment(clean, generator, cutout=config.cutout)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            target = self.train_labels[index]
            with self.autocast():
                if self.cotrain is not None:  # every member on its own augmentation of the batch
                    views = [batch, *(augment(clean, generator, cutout=config.cutout) for _ in self.model.segments[1:])]
                    logits = self.model.member_logits(views)
                    loss = self.cotrain(logits, target, epoch + step / self.steps_per_epoch)
                else:
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
        config = self.config
        if self.rank == 0:
            depths = ", ".join(f"{e.depth} ({e.params / 1e6:.3f} M, {e.macs / 1e6:.1f} MMAC)" for e in self.model.exits)
            shape = "x".join(map(str, self.input_size))
            print(f"{config.model}: {len(self.train_labels)} train / {len(self.heldout_labels)} held-out images "
                  f"({shape}, C x H x W) on {self.device} x{self.world}; exits {depths}")
        for epoch in range(self.start_epoch, config.last_epoch):
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
            epochs_completed=epochs_done, epochs_planned=self.config.epochs, heldout_acc=heldout_acc,
        )
        was_cl = self.channels_last
        if was_cl:
            self.model.to(memory_format=torch.contiguous_format)
        save_checkpoint(self.output, self.model, metadata)
        if self.config.snapshots:
            save_checkpoint(snapshot_path(self.output, epochs_done), self.model, metadata)
        save_resume_state(self.resume_file, {
            "model_name": self.config.model, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epochs_done, "history": self.history, "init_from": self.init_meta,
        })
        if was_cl:
            self.model.to(memory_format=torch.channels_last)
        with open(self.log_file, "a") as log:
            log.write(json.dumps(self.history[-1]) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trainer_class = Trainer
    if args.online_distill:
        from training.online_distill import OnlineDistillTrainer as trainer_class
    trainer_class(TrainConfig(**vars(args))).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
