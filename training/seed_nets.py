"""The seed papers' other multi-exit networks: AuxResNet variants (Multi-way BP on deeper
and wider ResNets), registered in `training.models`' registry.

Published test errors (the AuxResNet release; CIFAR-10 / CIFAR-100, SVHN):

| entry | exits | paper name | CIFAR-10 | CIFAR-100 | SVHN |
|---|---|---|---|---|---|
| `mwresnet56_2` | 45, 56 | AuxResNet-56-2 | 5.89 | 26.83 | 1.84 (1.63 dagger) |
| `mwresnet56_3` | 35, 45, 56 | AuxResNet-56-3 | - | - | 1.58 (dagger) |
| `mwresnet44_2` | 39, 44 | AuxResNet-44-2 | - | - | 1.96 (1.75 dagger) |
| `mwwrn26_2_10` | 19, 26 | AuxResNet-26-2/10 | 3.91 | 19.69 | - |

Depth counts as in `preact_resnet_with_exits`: the stem conv and two convs a block
(1 + 2b), the final exit also its FC. The wide network is a pre-activation wide ResNet
(Zagoruyko & Komodakis, 2016): stem 3x3 conv to 16 channels, three stages of 16k, 32k and
64k channels (k the width factor), dropout between a block's two convolutions as an
option. WRN-26-10 has four blocks a stage; its early exit at depth 19 = 1 + 2 x 9 sits
after block 9, the first block of the third stage.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models import (
    ModelBuilder,
    MultiExitNet,
    PreActBlock,
    _resnet_entry,
    register_model,
    three_stage_net,
)

# name -> (depth, exit blocks); ResNet-56 has 27 blocks, ResNet-44 21.
AUX_RESNETS = {
    "mwresnet56_2": (56, [22, 27]),  # exits 45, 56
    "mwresnet56_3": (56, [17, 22, 27]),  # exits 35, 45, 56
    "mwresnet44_2": (44, [19, 21]),  # exits 39, 44
}
# name -> (depth, width factor, exit blocks); WRN-26 has 12 blocks, 4 a stage.
WIDE_RESNETS = {
    "mwwrn26_2_10": (26, 10, [9, 12]),  # exits 19 (inside stage 3), 26
}


class WidePreActBlock(PreActBlock):
    """Pre-activation block with dropout between its two convolutions (WRN's basic-wide-dropout)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + identity


def wide_resnet_with_exits(
    name: str,
    depth: int,
    widen: int,
    exit_blocks: list[int],
    num_classes: int,
    width: int = 16,
    dropout: float = 0.0,
    input_size: tuple[int, int, int] = (3, 32, 32),
    early_head: str = "linear",
) -> MultiExitNet:
    """Pre-activation wide ResNet-`depth`-`widen` with exits after `exit_blocks`.

    `width` is the stem's channels (16 in WRN); stage s has width x widen x 2^s channels.
    `dropout` is the drop probability between each block's convolutions (WRN used 0.3).
    """
    if (depth - 2) % 6:
        raise ValueError(f"wide ResNet depth must be 6n+2, got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return three_stage_net(name, depth, exit_blocks, num_classes, width, widen, input_size, early_head,
                           lambda inputs, outputs, stride: WidePreActBlock(inputs, outputs, stride, dropout=dropout))


def _wide_entry(name: str, depth: int, widen: int, exit_blocks: list[int]) -> ModelBuilder:
    def builder(num_classes: int = 10, **kwargs) -> MultiExitNet:
        return wide_resnet_with_exits(name, depth, widen, exit_blocks, num_classes, **kwargs)

    builder.__name__ = name
    builder.__doc__ = (f"Pre-activation wide ResNet-{depth}-{widen} (dropout option) "
                       f"with exits after blocks {exit_blocks}.")
    return builder


for _name, (_depth, _blocks) in AUX_RESNETS.items():
    register_model(_resnet_entry(_name, _depth, _blocks))
for _name, (_depth, _widen, _blocks) in WIDE_RESNETS.items():
    register_model(_wide_entry(_name, _depth, _widen, _blocks))
