"""Train a multi-exit network with multi-way back-propagation.

    python -m training.train --model mwresnet56_5 --epochs 30 --schedule onecycle
    torchrun --nproc_per_node 2 -m training.train ...   # data parallel (gloo/NCCL)

Every exit's cross-entropy is summed with per-exit weights (Multi-way BP); early
exits can also be distilled from the final exit, and every exit from another trained
network's final exit (`--teacher`). A checkpoint (safetensors +
JSON) is written atomically after every epoch, with a resume state beside it.
"""

from __future__ import annotations

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
from training.attach import takes_pretrained
from training.checkpoint import (
    build_metadata,
    load_checkpoint,
    save_checkpoint,
    save_resume_state,
    snapshot_path,
)
from training.cotrain import AnytimeEnsemble, CoTrainingLoss
from training.datasets import channel_stats, heldout_split, load_split
from training.evaluate import evaluate_exits
from training.losses import MultiExitLoss, parse_exit_weights
from training.models import create_model, list_models
from training.schedules import build_scheduler, fast_forward
from training.train_options import DEFAULTS, TrainConfig, build_parser  # noqa: F401 (re-exported)
from training.transforms import augment, to_normalized


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
                                  config.distill_weight, config.temperature, config.teacher_weight)
        self.teacher = self._load_teacher(config.teacher) if config.teacher else None
        # Co-trained members (divide and co-train) learn from their own logits, not the ensemble exits.
        self.cotrain = CoTrainingLoss(config.agreement_weight, config.agreement_warmup) \
            if isinstance(self.model, AnytimeEnsemble) else None
        if self.cotrain is not None and self.world > 1:
            raise UserError("co-training a _split model runs in one process (no DDP yet)")

    def _load_teacher(self, path: Path):
        """The frozen network whose final exit every exit learns from (--teacher)."""
        teacher, meta = load_checkpoint(path)
        if tuple(meta.input_size) != tuple(self.input_size) or meta.num_classes != len(self.classes):
            raise UserError(f"--teacher {path} takes {meta.input_size} inputs and answers {meta.num_classes} "
                            f"classes; the data here: {list(self.input_size)}, {len(self.classes)}")
        if (meta.heldout.seed, meta.heldout.size) != (self.config.heldout_seed, self.config.heldout_size):
            raise UserError(f"--teacher {path} was trained with another held-out split; its answers would carry "
                            "what it learnt from this run's held-out images")
        if isinstance(self.model, AnytimeEnsemble):
            raise UserError("--teacher is not supported for co-trained <entry>_split<S> models")
        teacher.requires_grad_(False)
        teacher.eval().to(self.device)
        if self.channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.teacher_meta = {"path": str(path), "model": meta.model, "date": meta.date,
                             "heldout_acc": meta.heldout_acc}
        return teacher

    def _build_optimisation(self) -> None:
        config = self.config
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, nesterov=True)
        self.epoch_images = min(config.epoch_images or len(self.train_labels), len(self.train_labels))
        self.steps_per_epoch = math.ceil(self.epoch_images / (config.batch_size * self.world))
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
        self.teacher_forward = self.teacher
        if self.config.compile == "on":  # the uncompiled modules share the parameters: saving and evaluation use them
            self.network = torch.compile(self.network)
            if self.teacher is not None:
                self.teacher_forward = torch.compile(self.teacher)
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
                      init_from=self.init_meta, teacher=getattr(self, "teacher_meta", None))
        return config

    def train_epoch(self, epoch: int) -> dict:
        config = self.config
        generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_labels), generator=generator, device=self.device)
        order = order[: self.epoch_images][self.rank :: self.world]  # --epoch-images: a new draw each epoch
        self.model.train()
        if config.freeze_trunk:  # frozen parts keep their batch-norm statistics too
            for module in (self.model.stem, *self.model.segments, self.model.heads[-1]):
                module.eval()
        if config.freeze_backbone:
            for module in (self.model.stem, *self.model.segments):
                module.eval()
        num_exits = len(self.model.exits)
        seen = 0  # the sums stay on the device: no synchronisation a step (progress bars read them every 10)
        loss_sum = torch.zeros((), device=self.device)
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
                    if self.teacher is None:
                        loss = self.loss(logits, target)
                    else:
                        with torch.no_grad():
                            teacher_logits = self.teacher_forward(batch)[-1]
                        loss = self.loss(logits, target, teacher_logits)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            with torch.no_grad():
                for k, out in enumerate(logits):
                    correct[k] += (out.argmax(1) == target).sum()
                loss_sum += loss.detach().float() * len(index)
            seen += len(index)
            if not progress.disable and (step % 10 == 0 or step == self.steps_per_epoch - 1):
                accs = (correct / seen * 100).tolist()
                progress.set_postfix_str(f"loss {loss_sum.item() / seen:.3f} acc " + "/".join(f"{a:.0f}" for a in accs))
        return {"train_loss": loss_sum.item() / max(1, seen),
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
    args = build_parser(__doc__).parse_args(argv)
    trainer_class = Trainer
    if args.online_distill:
        from training.online_distill import OnlineDistillTrainer as trainer_class
    trainer_class(TrainConfig(**vars(args))).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
