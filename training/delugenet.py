"""DelugeNets (Kuen et al., 2017): cross-layer depthwise inflows, as multi-exit networks.

Every block of a DelugeNet stage takes its input from *all* preceding blocks of the stage
through a cross-layer depthwise convolution: output channel c of the inflow is a learned
combination of channel c of every preceding block's output (one weight per layer and
channel, plus a 3x3 spatial kernel with stride 2 where a stage starts and the map halves).
The block body is a pre-activation bottleneck (1x1, 3x3, 1x1); there is no residual
shortcut: the inflow replaces it. The first block of a stage takes its inflow from all
blocks of the previous stage.

Exits sit at stage ends. Because the next stage reads every block of the stage before,
a segment boundary carries the stacked outputs of all of that stage's blocks
(`blocks x channels` maps, layer-major), not one block's output: `boundary_floats`
counts it per image. The exit head reads the last block's output only.

Our reading of the paper's configurations: three stages of bottleneck blocks with outputs
w, 2w, 4w (w = 128), inner width a quarter of the output (half for the wide variant),
depth = 3 x blocks + 2 (DelugeNet-146: 16 blocks a stage, 218: 24). Counted here:
6.25M / 9.65M / 18.26M parameters against the published 6.7M / 10.0M / 20.2M (the paper's
own module details, such as the normalisation inside the inflow, are not all public).
"""

from __future__ import annotations

import torch
from torch import nn

from training.models import ExitSpec, ModelBuilder, MultiExitNet, _init_weights, make_head, register_model


class CrossLayerDepthwise(nn.Module):
    """Combine `layers` stacked maps of `channels` channels each, channel by channel.

    Input: [N, layers * channels, H, W], layer-major (layer 0's channels first). Output
    channel c = sum over layers l of kernel[c, l] * BN(input)[l, c] (a `kernel_size`
    spatial kernel, `stride`), i.e. a grouped convolution with one group per channel
    over the channel-major reordering of the stack.
    """

    def __init__(self, channels: int, layers: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.channels, self.layers = channels, layers
        self.bn = nn.BatchNorm2d(channels * layers)
        self.conv = nn.Conv2d(channels * layers, channels, kernel_size, stride, kernel_size // 2,
                              groups=channels, bias=False)

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        x = self.bn(stack)
        n, _, h, w = x.shape
        # [N, L*C, H, W] layer-major -> [N, C*L, H, W] channel-major: group c sees channel c of every layer.
        x = x.reshape(n, self.layers, self.channels, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return self.conv(x)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck body without a shortcut: BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1."""

    def __init__(self, in_channels: int, inner: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(), nn.Conv2d(inner, inner, 3, 1, 1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(), nn.Conv2d(inner, out_channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DelugeBlock(nn.Module):
    """One DelugeNet block: the cross-layer depthwise inflow from the stacked preceding
    outputs, then the bottleneck body."""

    def __init__(self, in_channels: int, in_layers: int, out_channels: int, inner: int, stride: int) -> None:
        super().__init__()
        kernel = 3 if stride > 1 else 1
        self.inflow = CrossLayerDepthwise(in_channels, in_layers, kernel, stride)
        self.body = Bottleneck(in_channels, inner, out_channels)

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return self.body(self.inflow(stack))


class DelugeStage(nn.Module):
    """`blocks` DelugeBlocks; block 0 reads every layer of the input stack (the previous
    stage, with stride), block j > 0 every earlier block of this stage. Returns the stack of
    all its blocks' outputs, [N, blocks * out_channels, H', W']."""

    def __init__(self, in_channels: int, in_layers: int, out_channels: int, inner: int,
                 blocks: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [DelugeBlock(in_channels, in_layers, out_channels, inner, stride)]
            + [DelugeBlock(out_channels, j, out_channels, inner, 1) for j in range(1, blocks)]
        )

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        outputs = [self.blocks[0](stack)]
        for block in self.blocks[1:]:
            outputs.append(block(torch.cat(outputs, dim=1)))
        return torch.cat(outputs, dim=1)


class LastLayer(nn.Module):
    """An exit head applied to the last block's maps of a stage's stack."""

    def __init__(self, channels: int, head: nn.Module) -> None:
        super().__init__()
        self.channels, self.head = channels, head

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return self.head(stack[:, -self.channels:])


def delugenet_with_exits(
    name: str,
    blocks_per_stage: int,
    num_classes: int,
    width: int = 128,
    bottleneck_ratio: int = 4,
    input_size: tuple[int, int, int] = (3, 32, 32),
    early_head: str = "linear",
) -> MultiExitNet:
    """A CIFAR DelugeNet: stem conv, three stages (outputs w, 2w, 4w; stride 2 into stages 2
    and 3), one exit at the end of each stage. Depth = 3 x 3 x blocks_per_stage + 2."""
    depth = 9 * blocks_per_stage + 2
    stem_channels = width // 2
    stem = nn.Conv2d(input_size[0], stem_channels, 3, 1, 1, bias=False)
    segments, heads, exits = [], [], []
    channels, layers, spatial = stem_channels, 1, input_size[1]
    for stage in range(3):
        out_channels = width * 2**stage
        stride = 2 if stage > 0 else 1
        spatial //= stride
        segments.append(DelugeStage(channels, layers, out_channels, out_channels // bottleneck_ratio,
                                     blocks_per_stage, stride))
        kind = "linear" if stage == 2 else early_head
        heads.append(LastLayer(out_channels, make_head(kind, out_channels, num_classes, spatial,
                                                       max_channels=4 * width)))
        blocks = blocks_per_stage * (stage + 1)
        exits.append(ExitSpec(index=stage, depth=depth if stage == 2 else 1 + 3 * blocks, block=blocks))
        channels, layers = out_channels, blocks_per_stage
    model = MultiExitNet(name, stem, segments, heads, exits, num_classes, input_size)
    _init_weights(model)
    return model


def boundary_floats(model: MultiExitNet) -> list[int]:
    """Floats per image that cross each segment boundary (what segment k hands segment k+1);
    the last segment hands nothing on."""
    sizes = []
    x = torch.zeros(1, *model.input_size)
    with torch.no_grad():
        x = model.stem(x)
        for segment in model.segments[:-1]:
            x = segment(x)
            sizes.append(x[0].numel())
    return [*sizes, 0]


def _entry(name: str, blocks_per_stage: int, width: int, bottleneck_ratio: int, doc: str) -> ModelBuilder:
    def builder(num_classes: int = 10, **kwargs) -> MultiExitNet:
        kwargs.setdefault("width", width)
        kwargs.setdefault("bottleneck_ratio", bottleneck_ratio)
        return delugenet_with_exits(name, blocks_per_stage, num_classes, **kwargs)

    builder.__name__ = name
    builder.__doc__ = doc
    return builder


for _name, _blocks, _width, _ratio, _doc in [
    ("mwdelugenet29_3", 3, 64, 4, "Small CIFAR DelugeNet-29 (3 blocks a stage, w=64): trains on CPU; "
                                  "about ResNet-20's MACs."),
    ("mwdelugenet146_3", 16, 128, 4, "DelugeNet-146 (published: 6.7M params, 3.98% CIFAR-10 error)."),
    ("mwdelugenet218_3", 24, 128, 4, "DelugeNet-218 (published: 10.0M params, 3.88% CIFAR-10 error)."),
    ("mwwidedelugenet146_3", 16, 128, 2, "Wide-DelugeNet-146 (published: 20.2M params, 3.76% CIFAR-10 error)."),
]:
    register_model(_entry(_name, _blocks, _width, _ratio, _doc))
