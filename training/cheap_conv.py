"""Cheap convolutions (Xie et al., "Training convolutional neural networks with cheap
convolutions and online distillation"): a student made from any registry network by
swapping its standard 3x3 convolutions for cheaper ones, with no other redesign.

`create_model(name, conv=KIND)` builds the student; KIND is one of

- `standard`: the network as registered (the default);
- `group:G`: 3x3 group convolution with G groups (params and MACs / G);
- `depthwise`: depth-wise separable, a 3x3 depth-wise convolution (one filter per
  channel, the stride) followed by a 1x1 point-wise convolution, no activation between;
- `shift`: the shift operation (Wu et al., 2018) followed by a 1x1 point-wise
  convolution (the stride). The channels are cut into nine contiguous groups, one per
  offset of the 3x3 neighbourhood, and each group is moved by its offset with zeros
  filled in. The shift has no parameters and costs no multiply-accumulates: in PyTorch
  and in ONNX it is one zero `Pad` and nine `Slice`s joined by a `Concat` (data movement
  only), so the FLOP counter, and `ExitSpec.macs`, count only the point-wise convolution.

Swapped: every 3x3 `nn.Conv2d` with `groups == 1` that does not read the image (the stem
stays standard, as in the paper); 1x1 shortcuts and convolutions that are already grouped
stay as they are. New convolutions get the registry's Kaiming initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

CONV_KINDS = ("standard", "group:G", "depthwise", "shift")
# The nine offsets (dy, dx) of a 3x3 neighbourhood, row by row; group k moves by OFFSETS[k].
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def parse_conv(text: str) -> tuple[str, int]:
    """"standard", "group:4", "depthwise" or "shift" -> (kind, groups); a UserError otherwise."""
    if text in ("standard", "depthwise", "shift"):
        return text, 1
    if text.startswith("group:"):
        try:
            groups = int(text.removeprefix("group:"))
        except ValueError:
            groups = 0
        if groups >= 2:
            return "group", groups
    raise UserError(f"unknown convolution {text!r}; known: {', '.join(CONV_KINDS)} (G an integer >= 2)")


def shift_groups(channels: int) -> list[tuple[int, int]]:
    """The [start, end) channel range of each of the nine offset groups (sizes differ by at most one)."""
    bounds = [k * channels // len(OFFSETS) for k in range(len(OFFSETS) + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def shift(x: torch.Tensor) -> torch.Tensor:
    """Move each channel group by its offset: out[c, y, x] = in[c, y + dy, x + dx], zero outside."""
    height, width = x.shape[2], x.shape[3]
    padded = F.pad(x, (1, 1, 1, 1))
    parts = [padded[:, start:end, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
             for (start, end), (dy, dx) in zip(shift_groups(x.shape[1]), OFFSETS) if end > start]
    return torch.cat(parts, dim=1)


class DepthwiseSeparableConv(nn.Module):
    """3x3 depth-wise convolution (carrying the stride) then 1x1 point-wise convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ShiftConv(nn.Module):
    """Shift (no parameters, no MACs) then a 1x1 point-wise convolution carrying the stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(shift(x))


def cheap_conv(conv: nn.Conv2d, kind: str, groups: int) -> nn.Module:
    """The cheap replacement of a standard 3x3, padding-1 convolution."""
    in_channels, out_channels, stride = conv.in_channels, conv.out_channels, conv.stride[0]
    if kind == "group":
        if in_channels % groups or out_channels % groups:
            raise UserError(f"group:{groups} does not divide a {in_channels}->{out_channels} convolution")
        new: nn.Module = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=conv.bias is not None)
    elif kind == "depthwise":
        new = DepthwiseSeparableConv(in_channels, out_channels, stride)
    elif kind == "shift":
        new = ShiftConv(in_channels, out_channels, stride)
    else:
        raise UserError(f"unknown convolution kind {kind!r}")
    for module in new.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return new


def _swappable(module: nn.Module, image_channels: int) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.stride[0] == module.stride[1]
            and module.in_channels != image_channels)


def cheapen(model: nn.Module, conv: str, image_channels: int = 3) -> int:
    """Swap the standard 3x3 convolutions of `model` in place (see the module docstring);
    returns how many were swapped. `conv` = "standard" leaves the model as it is."""
    kind, groups = parse_conv(conv)
    if kind == "standard":
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _swappable(child, image_channels)]
    if not targets:
        raise UserError(f"--conv {conv}: the model has no standard 3x3 convolution to swap")
    for parent, name, child in targets:
        setattr(parent, name, cheap_conv(child, kind, groups))
    return len(targets)
