"""The options of `python -m training.train`: one typed config (TrainConfig, its defaults) and the
command line that names and explains them (build_parser)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import UserError
from common.paths import DEFAULT_DATA, REPO_ROOT
from training.cotrain import DEFAULT_AGREEMENT_WEIGHT, DEFAULT_WARMUP_EPOCHS
from training.datasets import CHANNELS, FORMATS
from training.models import HEADS, list_models
from training.schedules import SCHEDULES


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
    image_size: int | tuple[int, int] | None = None  # None: the data's own size; (height, width) if not square
    channels: int | None = None  # None: from the data (1 if every image is grayscale, else 3)
    heldout_size: int = 5000
    heldout_seed: int = 0
    cutout: int = 0
    limit_train: int = 0
    epoch_images: int = 0  # 0: every training image each epoch
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
    teacher: Path | None = None  # a trained multi-exit checkpoint whose final exit every exit is distilled from
    teacher_weight: float = 0.5
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
    compile: str = "off"  # torch.compile the network (and the teacher): fewer kernel launches a step on a GPU
    init_from: Path | None = None
    pretrained: Path | None = None
    snapshots: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be positive")
        if self.cutout < 0:
            raise UserError("--cutout must be 0 (off) or a square size in pixels")
        if self.epoch_images < 0:
            raise UserError("--epoch-images must be positive (or 0: every training image each epoch)")
        if self.freeze_trunk and not (self.init_from or self.resume):
            raise UserError("--freeze-trunk needs trained weights: give --init-from (or --resume)")
        if self.freeze_trunk and self.freeze_backbone:
            raise UserError("--freeze-trunk and --freeze-backbone are alternatives: the first also keeps the "
                            "final exit as loaded, the second trains every exit head")
        if self.teacher_weight < 0:
            raise UserError("--teacher-weight must be 0 or more")
        if self.teacher and (self.online_distill or self.freeze_trunk):
            raise UserError("--teacher distils a network trained whole: not with --online-distill or --freeze-trunk")
        if self.pretrained and self.init_from:
            raise UserError("--pretrained loads a backbone's weights, --init-from a multi-exit checkpoint: give one")
        if self.image_size is not None and min(image_sides(self.image_size)) < 1:
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


def image_sides(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def parse_image_size(text: str) -> int | tuple[int, int]:
    """`--image-size`: "32" (square) or "24,32" / "24x32" (height, width)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PIXELS or H,W") from None
    if len(sides) == 1:
        return sides[0]
    if len(sides) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not PIXELS or H,W")
    return sides[0] if sides[0] == sides[1] else (sides[0], sides[1])


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=description,
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
    data.add_argument("--image-size", type=parse_image_size, metavar="PIXELS|H,W",
                      help="resize every image to PIXELS x PIXELS, or to H x W (an image of another aspect ratio is "
                           "cropped to its centred box of that ratio first, as the gateway crops uploads; default: "
                           "the data's own size, which all images must share)")
    data.add_argument("--channels", type=int, choices=CHANNELS,
                      help="1 (grayscale) or 3 (RGB) (default: from the data, 1 if every image is grayscale)")
    data.add_argument("--heldout-size", type=int,
                      help="images carved from train/ for calibration, never trained on (default 5000)")
    data.add_argument("--heldout-seed", type=int, help="seed of the held-out split (recorded)")
    data.add_argument("--cutout", type=int, metavar="PIXELS",
                      help="Cutout augmentation: zero one PIXELS x PIXELS square per training image "
                           "(16 is the paper's size for CIFAR-10; default 0 = off)")
    data.add_argument("--limit-train", type=int, help="train on the first N images only (smoke runs)")
    data.add_argument("--epoch-images", type=int, metavar="N",
                      help="an epoch is N training images drawn at random, a new draw each epoch, so that a long "
                           "network gets short epochs (a checkpoint and a held-out evaluation each) and a "
                           "schedule that fits the time there is (default: every training image each epoch)")
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
    loss.add_argument("--teacher", type=Path, metavar="CHECKPOINT",
                      help="distil every exit from the final exit of this trained multi-exit checkpoint (same "
                           "classes, input size and held-out split; frozen, in eval mode, on the same augmented "
                           "batches): e.g. a cheap network's exits from the reference ResNet-56")
    loss.add_argument("--teacher-weight", type=float,
                      help="weight of each exit's T^2 x KL(teacher || exit) at --temperature (default %(default)s)")
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
    run.add_argument("--compile", choices=("off", "on"),
                     help="torch.compile the network and the teacher (default off). On a GPU a small network's "
                          "step is bound by Python's per-layer kernel launches (a ResNet-56 epoch on an H200: 11 s "
                          "eagerly, 3 s compiled at batch 512); compiling fuses them, after about 100 s of compilation")
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
