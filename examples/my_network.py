"""Your own network with early exits: a plain PyTorch module, exits attached by name.

Registered as `my_convnet` when this module is imported; name it in `EE_MODEL_MODULES` so that
training, export and evaluation (which rebuild a checkpoint's model by name) import it:

    EE_MODEL_MODULES=examples.my_network .venv/bin/python -m training.train --model my_convnet --data DIR
    EE_MODEL_MODULES=examples.my_network .venv/bin/python export/to_onnx.py \
        --checkpoint checkpoints/my_convnet.safetensors --output my_repository

The gateway needs neither this module nor torch: it serves the exported ONNX models.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from training.attach import attach_exits
from training.models import MultiExitNet, register_model


def block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2))


def convnet(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """Any network whose forward runs its children in order (an nn.Sequential, a torchvision ResNet...)."""
    return nn.Sequential(OrderedDict(
        block1=block(in_channels, 16), block2=block(16, 32), block3=block(32, 64),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, num_classes)))


@register_model
def my_convnet(num_classes: int = 10, input_size: tuple[int, int, int] = (3, 32, 32), **options) -> MultiExitNet:
    """Exits after block1 and block2; the final exit is the network's own pool-flatten-fc."""
    return attach_exits(convnet(input_size[0], num_classes), after=["block1", "block2"], num_classes=num_classes,
                        input_size=input_size, head=options.get("early_head", "linear"), name="my_convnet",
                        measure=False)
