"""Multi-exit networks: one registry, one `MultiExitNet` shape.

A `MultiExitNet` is a stem, an ordered list of segments and one exit head after
each segment. Exits are data (`ExitSpec`): the forward pass walks them, so the
same code serves every registry entry and every exporter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import UserError


@dataclass(frozen=True)
class ExitSpec:
    """One exit: where it sits and what reaching it costs (cumulative)."""

    index: int  # 0-based position in the exit list
    depth: int  # layer depth as the papers name it (15, 25, ... for ResNet-56)
    block: int  # number of residual blocks before this exit
    params: int = 0  # parameters of stem + segments up to here + this head
    # Multiply-accumulates for one image to reach this exit through the cascade: stem,
    # segments and every head up to here (a sample that continues paid the earlier heads).
    macs: int = 0
    # MACs of the per-exit model alone (stem, segments, this head only): for the final
    # exit, the full network without early exits, the baseline MAC fractions divide by.
    standalone_macs: int = 0


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv x2 + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # The projection takes the pre-activated input, as in the pre-act ResNet.
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + identity


class ExitHead(nn.Module):
    """BN-ReLU-global-average-pool-FC, the head of the Multi-way BP paper."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(x)).mean(dim=(2, 3)))


class ConvExitHead(nn.Module):
    """A head with capacity: `convs` pre-activation 3x3 convolutions (stride 2, doubling
    the channels, while the map is larger than `min_size`), then BN-ReLU, mixed
    max/average global pooling with a learned mix (SDN's feature reduction) and FC.

    On ResNet-56 two convolutions cost 2.4-4.7 MMAC per image, 4-7% of the exit they serve.
    """

    def __init__(self, channels: int, num_classes: int, spatial: int, convs: int = 2,
                 min_size: int = 8, max_channels: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(convs):
            stride = 2 if spatial > min_size else 1
            out_channels = min(max_channels, channels * stride) if stride == 2 else channels
            layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False)]
            channels, spatial = out_channels, spatial // stride
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.mix = nn.Parameter(torch.zeros(1))  # sigmoid(mix) weighs max against average pooling
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.body(x)))
        alpha = torch.sigmoid(self.mix)
        pooled = alpha * x.amax(dim=(2, 3)) + (1 - alpha) * x.mean(dim=(2, 3))
        return self.fc(pooled)


HEADS = ("linear", "conv1", "conv2")


def make_head(kind: str, channels: int, num_classes: int, spatial: int, max_channels: int) -> nn.Module:
    """An exit head by name: "linear" (the paper's BN-ReLU-pool-FC) or "conv1"/"conv2"
    (`ConvExitHead` with one or two convolutions)."""
    if kind == "linear":
        return ExitHead(channels, num_classes)
    if kind in ("conv1", "conv2"):
        return ConvExitHead(channels, num_classes, spatial, convs=int(kind[-1]), max_channels=max_channels)
    raise UserError(f"unknown exit head {kind!r}; known heads: {', '.join(HEADS)}")


class MultiExitNet(nn.Module):
    """Stem, segments, and one head after each segment."""

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        segments: list[nn.Module],
        heads: list[nn.Module],
        exits: list[ExitSpec],
        num_classes: int,
        input_size: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        if not (len(segments) == len(heads) == len(exits)):
            raise ValueError("segments, heads and exits must have the same length")
        self.name = name
        self.stem = stem
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.exits = list(exits)
        self.num_classes = num_classes
        self.input_size = input_size
        # Gradient the early heads send into the shared trunk while training
        # (1 = Multi-way BP; 0 = heads trained on detached features). Forward values
        # are unchanged, and eval/export never sees it.
        self.head_grad_scale = 1.0

    @property
    def exit_depths(self) -> list[int]:
        return [spec.depth for spec in self.exits]

    def exit_index(self, depth: int) -> int:
        """Index of the exit at `depth`; a UserError listing the depths otherwise."""
        for spec in self.exits:
            if spec.depth == depth:
                return spec.index
        raise UserError(
            f"model {self.name} has no exit at depth {depth}; "
            f"available depths: {', '.join(map(str, self.exit_depths))}"
        )

    def run_segment(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment `index` (the stem included for 0): returns (logits, activations)."""
        if index == 0:
            x = self.stem(x)
        features = self.segments[index](x)
        head_input = features
        scale = self.head_grad_scale
        if scale != 1.0 and index < len(self.segments) - 1 and self.training and torch.is_grad_enabled():
            head_input = features.detach() if scale == 0 else features * scale + features.detach() * (1 - scale)
        return self.heads[index](head_input), features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for index in range(len(self.segments)):
            exit_logits, x = self.run_segment(index, x)
            logits.append(exit_logits)
        return logits

    def forward_until(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stop at exit `index`: its logits and the activations the next segment takes."""
        if not 0 <= index < len(self.segments):
            raise IndexError(f"exit index {index} out of range 0..{len(self.segments) - 1}")
        for position in range(index + 1):
            exit_logits, x = self.run_segment(position, x)
        return exit_logits, x


# ----------------------------------------------------------------------------
# Registry

ModelBuilder = Callable[..., MultiExitNet]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    _REGISTRY[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **kwargs) -> MultiExitNet:
    """Build a registry entry; exits get their params and MACs measured. `<entry>_split<S>`
    builds S co-trained members of the entry as an anytime ensemble (training/cotrain.py)."""
    from training.cotrain import divide, parse_split_name

    conv = kwargs.pop("conv", "standard")
    split = parse_split_name(name)
    if split is not None and split[0] in _REGISTRY:
        model = divide(split[0], split[1], num_classes=num_classes, **kwargs)
    elif name in _REGISTRY:
        try:
            model = _REGISTRY[name](num_classes=num_classes, **kwargs)
        except TypeError as error:  # an option this entry does not take (e.g. --dropout on a ResNet)
            option = re.search(r"unexpected keyword argument '(\w+)'", str(error))
            if option is None:
                raise
            raise UserError(f"model {name} takes no {option[1]!r} option") from None
    else:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                        "(any of them with a _split<S> suffix: S co-trained members)")
    if conv != "standard":  # cheap-convolution student (training/cheap_conv.py)
        from training.cheap_conv import cheapen

        cheapen(model, conv, model.input_size[0])
    model.exits = measure_exits(model)
    return model


def preact_resnet_with_exits(
    name: str,
    depth: int,
    exit_blocks: list[int],
    num_classes: int,
    width: int = 16,
    input_size: tuple[int, int, int] = (3, 32, 32),
    early_head: str = "linear",
) -> MultiExitNet:
    """CIFAR pre-activation ResNet (3 stages, widths w/2w/4w) with exits after blocks.

    Exit depth counts the stem conv and two convs per block (1 + 2b); the final
    exit also counts its FC layer, so ResNet-56 exits read 15, 25, 35, 45, 56.
    `early_head` picks the heads of the early exits (see `make_head`); the final
    exit keeps the paper's head.
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return three_stage_net(name, depth, exit_blocks, num_classes, width, 1, input_size, early_head, PreActBlock)


def three_stage_net(name: str, depth: int, exit_blocks: list[int], num_classes: int, width: int, widen: int,
                    input_size: tuple[int, int, int], early_head: str, make_block) -> MultiExitNet:
    """The CIFAR ResNet layout both pre-activation families share: a 3x3 stem of `width` channels, three
    stages of (depth - 2) / 6 blocks with width x widen x 2^s channels (stride 2 entering stages 2 and 3),
    `make_block(in, out, stride)` for each block, and an exit after each of `exit_blocks` (the last one the
    final exit, with the paper's linear head; the others `early_head`)."""
    blocks_per_stage = (depth - 2) // 6
    total_blocks = 3 * blocks_per_stage
    if sorted(set(exit_blocks)) != exit_blocks or exit_blocks[-1] != total_blocks:
        raise ValueError(f"exit blocks must increase and end at {total_blocks}")
    blocks: list[tuple[int, int, int, int]] = []  # (in, out, stride, output map size)
    channels, spatial = width, input_size[1]
    for stage in range(3):
        out_channels = width * widen * 2**stage
        for position in range(blocks_per_stage):
            stride = 2 if stage > 0 and position == 0 else 1
            spatial //= stride
            blocks.append((channels, out_channels, stride, spatial))
            channels = out_channels
    stem = nn.Conv2d(input_size[0], width, 3, 1, 1, bias=False)
    segments, heads, exits = [], [], []
    start = 0
    for index, end in enumerate(exit_blocks):
        segments.append(nn.Sequential(*(make_block(*spec[:3]) for spec in blocks[start:end])))
        _, out_channels, _, out_size = blocks[end - 1]
        kind = "linear" if end == total_blocks else early_head
        heads.append(make_head(kind, out_channels, num_classes, out_size, max_channels=4 * width * widen))
        exit_depth = depth if end == total_blocks else 1 + 2 * end
        exits.append(ExitSpec(index=index, depth=exit_depth, block=end))
        start = end
    model = MultiExitNet(name, stem, segments, heads, exits, num_classes, input_size)
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _resnet_entry(name: str, depth: int, exit_blocks: list[int]) -> ModelBuilder:
    def builder(num_classes: int = 10, **kwargs) -> MultiExitNet:
        return preact_resnet_with_exits(name, depth, exit_blocks, num_classes, **kwargs)

    builder.__name__ = name
    builder.__doc__ = f"Pre-activation ResNet-{depth} with exits after blocks {exit_blocks}."
    return builder


# Exit placements: ResNet-56 exactly as Multi-way BP (blocks 7/12/17/22/27);
# the others spread their exits over the depth in the same spirit.
for _name, _depth, _blocks in [
    ("mwresnet8_3", 8, [1, 2, 3]),  # one block per stage: for tests and demos
    ("mwresnet20_3", 20, [3, 6, 9]),
    ("mwresnet32_4", 32, [4, 8, 12, 15]),
    ("mwresnet44_4", 44, [6, 11, 16, 21]),
    ("mwresnet56_5", 56, [7, 12, 17, 22, 27]),
    ("mwresnet110_5", 110, [14, 24, 34, 44, 54]),
]:
    register_model(_resnet_entry(_name, _depth, _blocks))


# ----------------------------------------------------------------------------
# Measuring exits


def count_macs(module: Callable[[torch.Tensor], object], example: torch.Tensor) -> int:
    """MACs of one call, counted by torch's FLOP counter (1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example)
    return counter.get_total_flops() // 2


def measure_exits(model: MultiExitNet) -> list[ExitSpec]:
    """Params of the prefix up to each exit (its own head included) and MACs for one image:
    through the cascade (`forward_until` runs every earlier head too) and of the
    per-exit model alone (stem, segments, this head only)."""
    was_training = model.training
    model.eval()
    example = torch.zeros(1, *model.input_size)
    measured = []
    prefix_params = sum(p.numel() for p in model.stem.parameters())
    for spec in model.exits:
        prefix_params += sum(p.numel() for p in model.segments[spec.index].parameters())
        head_params = sum(p.numel() for p in model.heads[spec.index].parameters())
        cascade = count_macs(lambda x, i=spec.index: model.forward_until(i, x), example)
        standalone = count_macs(lambda x, i=spec.index: model.heads[i](_trunk_until(model, i, x)), example)
        measured.append(ExitSpec(spec.index, spec.depth, spec.block, prefix_params + head_params,
                                 cascade, standalone))
    model.train(was_training)
    return measured


def _trunk_until(model: MultiExitNet, index: int, x: torch.Tensor) -> torch.Tensor:
    """Stem and segments up to `index`, no head: the activations head `index` takes."""
    x = model.stem(x)
    for segment in model.segments[: index + 1]:
        x = segment(x)
    return x


# Registry entries that live in their own modules register themselves on import.
from training import attach as _attach  # noqa: E402,F401  (tv_*/timm_* backbones, EE_MODEL_MODULES)
from training import delugenet as _delugenet  # noqa: E402,F401
from training import seed_nets as _seed_nets  # noqa: E402,F401
