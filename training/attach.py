"""Exits on any backbone: `attach_exits(backbone, after=[...])` makes a `MultiExitNet`.

    from torchvision.models import resnet18
    model = attach_exits(resnet18(), after=["layer1", "layer2", "layer3"], num_classes=10,
                         input_size=(3, 224, 224), head="linear")

The backbone is cut into consecutive pieces at the modules named in `after` (dotted
names reach into `nn.Sequential` containers: "features.6", "blocks.2"); an exit head
is attached after each, and the final exit is the backbone's own classifier (its last
`nn.Linear` resized to `num_classes`) after its last feature module. What the heads
take (channels, map size) is found by a dry run on `input_size`, and the cut is
checked against the backbone's own forward before anything is attached, so a
backbone whose forward is not the sequence of its children is refused with a clear
error rather than cut wrongly. The result trains, exports per exit and per segment,
and serves like the registry's own networks.

The registry entries here (`tv_resnet18`, `tv_resnet50`, `tv_mobilenet_v3_small`,
`tv_mobilenet_v3_large`, `timm_efficientnet_b0`) are built without pre-trained
weights (nothing is downloaded); `pretrained=PATH` (`--pretrained PATH` in
training.train) loads a local state dict of the original network first.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from training.models import HEADS, ExitSpec, ModelBuilder, MultiExitNet, make_head, measure_exits, register_model

HeadFactory = Callable[[int, int, int], nn.Module]  # (channels, num_classes, map size) -> head
SHORTCUT_NAMES = ("downsample", "shortcut")  # projection shortcuts: not counted in an exit's depth


class BackboneTail(nn.Module):
    """The backbone's own classifier: the modules after its last feature module, run in order,
    with the flattening its forward does before the first linear layer."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.body = nn.Sequential(OrderedDict((_safe(name), module) for name, module in modules))
        self.flatten_before = [_starts_with_linear(module) for _, module in modules]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module, flatten in zip(self.body, self.flatten_before):
            if flatten and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = module(x)
        return x


def _safe(name: str) -> str:
    return name.replace(".", "_")


def _starts_with_linear(module: nn.Module) -> bool:
    first = next((m for m in module.modules() if not list(m.children())), module)
    return isinstance(first, nn.Linear)


def _is_global_pool(module: nn.Module) -> bool:
    kind = type(module).__name__
    return "Adaptive" in kind and "Pool" in kind  # torch's AdaptiveAvg/MaxPool2d, timm's SelectAdaptivePool2d


def flatten_modules(backbone: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The backbone's children in order, containers on the way to `names` opened up, so that each of
    `names` is one entry. Only `nn.Sequential` containers can be opened (their forward is the order)."""
    wanted = set(names)

    def walk(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        entries = []
        for child_name, child in module.named_children():
            qualified = f"{prefix}{child_name}"
            if any(name.startswith(qualified + ".") for name in wanted):
                if not isinstance(child, nn.Sequential):
                    raise UserError(f"cannot attach an exit inside {qualified!r} ({type(child).__name__}): only "
                                    "nn.Sequential containers run their children in order; name one of its "
                                    "neighbours or the container itself")
                entries += walk(child, qualified + ".")
            else:
                entries.append((qualified, child))
        return entries

    entries = walk(backbone, "")
    found = {name for name, _ in entries}
    missing = [name for name in names if name not in found]
    if missing:
        known = ", ".join(name for name, _ in entries)
        raise UserError(f"no module named {', '.join(map(repr, missing))} in the backbone's forward order; "
                        f"its modules: {known}")
    return entries


def _run(modules: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    return BackboneTail(modules)(x) if modules else x


def _weight_layers(modules: Sequence[tuple[str, nn.Module]]) -> int:
    """Convolutions and linear layers on the main path (projection shortcuts not counted)."""
    count = 0
    for prefix, module in modules:
        for name, sub in module.named_modules(prefix=prefix):
            if isinstance(sub, (nn.Conv2d, nn.Linear)) and not any(part in SHORTCUT_NAMES
                                                                   for part in name.split(".")):
                count += 1
    return count


def adapt_input_channels(backbone: nn.Module, channels: int) -> None:
    """Make the backbone's first convolution take `channels` input channels. Its weights are summed
    over the old channels and spread over the new ones, so a grayscale image through the new
    convolution gives what the same image repeated over RGB gave through the old one."""
    name, conv = next(((n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == channels:
        return
    if conv.groups != 1:
        raise UserError(f"cannot adapt {name!r} (a grouped convolution) to {channels} input channels")
    replacement = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        replacement.weight.copy_(summed.repeat(1, channels, 1, 1) / channels)
        if conv.bias is not None:
            replacement.bias.copy_(conv.bias)
    parent_name, _, attribute = name.rpartition(".")
    setattr(backbone.get_submodule(parent_name) if parent_name else backbone, attribute, replacement)


def _resize_last_linear(tail: BackboneTail, num_classes: int) -> None:
    """The tail's last linear layer with `num_classes` outputs (a new one, unless it has them already)."""
    linears = [(name, m) for name, m in tail.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the backbone's classifier has no nn.Linear to give num_classes outputs: "
                        "pass final_head='linear' (or a head factory)")
    name, last = linears[-1]
    if last.out_features == num_classes:
        return
    parent_name, _, attribute = name.rpartition(".")
    setattr(tail.get_submodule(parent_name), attribute,
            nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def _make_head(head: str | HeadFactory, channels: int, num_classes: int, spatial: int) -> nn.Module:
    if callable(head):
        return head(channels, num_classes, spatial)
    if head not in HEADS:
        raise UserError(f"unknown exit head {head!r}; known heads: {', '.join(HEADS)}, or a callable")
    return make_head(head, channels, num_classes, spatial, max_channels=channels)


def attach_exits(
    backbone: nn.Module,
    after: Sequence[str],
    *,
    num_classes: int,
    input_size: tuple[int, int, int] = (3, 224, 224),
    head: str | HeadFactory = "linear",
    final_head: str | HeadFactory = "backbone",
    end: str | None = None,
    name: str = "custom",
    measure: bool = True,
) -> MultiExitNet:
    """A `MultiExitNet` over `backbone`, with an exit after each module named in `after`.

    - `after`: module names in forward order ("layer1", "features.6", ...).
    - `end`: the last feature module, where the final exit sits (default: the module before the
      backbone's first global pooling; without one, the last module whose output is a feature map).
    - `head`: the early exits' heads: "linear" (BN-ReLU-pool-FC), "conv1"/"conv2", or a callable
      (channels, num_classes, map size) -> module.
    - `final_head`: "backbone" (its own classifier, the last linear layer resized to `num_classes`)
      or a head as for `head`.
    - `input_size`: (C, H, W); a first convolution of other input channels is adapted
      (`adapt_input_channels`). Exit shapes come from a dry run at this size.
    - `measure`: count every exit's parameters and MACs (`create_model` does it for registry entries).
    """
    backbone.eval()
    adapt_input_channels(backbone, input_size[0])
    modules = flatten_modules(backbone, [*after, *([end] if end else [])])
    names = [module_name for module_name, _ in modules]
    example = torch.zeros(2, *input_size)
    with torch.no_grad():
        outputs, x = [], example
        for position in range(len(modules)):
            x = _run(modules[position:position + 1], x)
            outputs.append(x)
        expected = backbone(example)
    if not isinstance(expected, torch.Tensor) or expected.shape != x.shape or not torch.allclose(
            expected, x, rtol=1e-4, atol=1e-5):
        raise UserError(f"{type(backbone).__name__}'s forward is not the sequence of its children "
                        f"({', '.join(names)}): wrap its pieces in an nn.Sequential whose order is the forward's")
    if end is not None:
        end_index = names.index(end)
    else:
        pool = next((i for i, (_, module) in enumerate(modules) if _is_global_pool(module)), None)
        end_index = pool - 1 if pool is not None else max(i for i, out in enumerate(outputs) if out.dim() == 4)
    boundaries = [names.index(module_name) for module_name in after]
    if boundaries != sorted(set(boundaries)) or (boundaries and boundaries[-1] > end_index):
        raise UserError(f"exits must follow each other in forward order and come no later than the final "
                        f"features ({names[end_index]!r}); got after={list(after)}")
    if not boundaries or boundaries[-1] != end_index:
        boundaries.append(end_index)

    segments, heads, exits = [], [], []
    start, depth = 0, 0
    for index, boundary in enumerate(boundaries):
        piece = modules[start:boundary + 1]
        segments.append(nn.Sequential(OrderedDict((_safe(n), m) for n, m in piece)))
        features = outputs[boundary]
        if features.dim() != 4:
            raise UserError(f"an exit after {names[boundary]!r} needs a feature map (N, C, H, W); "
                            f"it gives {tuple(features.shape)}")
        channels, spatial = features.shape[1], min(features.shape[2:])
        final = index == len(boundaries) - 1
        if final and final_head == "backbone":
            exit_head = BackboneTail(modules[end_index + 1:])
            _resize_last_linear(exit_head, num_classes)
        else:
            exit_head = _make_head(final_head if final else head, channels, num_classes, spatial)
        depth = max(depth + 1, _weight_layers(modules[:boundary + 1])
                    + (_weight_layers([("head", exit_head)]) if final else 0))
        heads.append(exit_head)
        exits.append(ExitSpec(index=index, depth=depth, block=boundary + 1))
        start = boundary + 1
    model = MultiExitNet(name, nn.Identity(), segments, heads, exits, num_classes, tuple(input_size))
    if measure:
        model.exits = measure_exits(model)
    return model


# ----------------------------------------------------------------------------
# Registry entries over torchvision and timm backbones


def import_torchvision():
    """torchvision, importable where its C++ operators cannot load.

    The PyPI wheel of torchvision is built against CUDA torch; beside a CPU-only torch its
    operator library fails to load and the import then stops at registering a fake kernel for
    `torchvision::nms`. The networks used here need none of those operators, so their schemas are
    declared (never implemented) and the import goes on; where the library loads, nothing changes.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    import sys

    for module_name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module_name]
    global _DECLARED_OPS
    if _DECLARED_OPS is None:
        _DECLARED_OPS = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _DECLARED_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


_DECLARED_OPS = None


def _torchvision_model(factory: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torchvision = import_torchvision()
        return getattr(torchvision.models, factory)(weights=None)

    return build


def _timm_model(timm_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import_torchvision()  # timm imports torchvision
        import timm

        return timm.create_model(timm_name, pretrained=False)

    return build


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state dict: .safetensors, or a torch file (a plain state dict, or one under
    "state_dict"/"model"), loaded with weights_only."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"pre-trained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors of many kinds
        raise UserError(f"cannot read pre-trained weights {path}: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


def _backbone_entry(entry: str, build: Callable[[], nn.Module], after: list[str], end: str | None,
                    source: str) -> ModelBuilder:
    def builder(num_classes: int = 10, input_size: tuple[int, int, int] = (3, 224, 224),
                early_head: str = "linear", pretrained: str | Path | None = None,
                width: int | None = None) -> MultiExitNet:
        if width not in (None, 16):
            raise UserError(f"{entry} has no width option (it is {source})")
        backbone = build()
        if pretrained is not None:
            missing, unexpected = backbone.load_state_dict(load_state_dict_file(pretrained), strict=False)
            if missing or unexpected:
                raise UserError(f"{pretrained} does not fit {source}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
        return attach_exits(backbone, after, num_classes=num_classes, input_size=tuple(input_size),
                            head=early_head, end=end, name=entry, measure=False)

    builder.__name__ = entry
    builder.__doc__ = f"{source} with exits after {', '.join(after)} and its own classifier as the final exit."
    return builder


def takes_pretrained(model_name: str) -> bool:
    """Whether registry entry `model_name` loads pre-trained backbone weights (a `pretrained` parameter)."""
    from training.models import _REGISTRY

    builder = _REGISTRY.get(model_name)
    return builder is not None and "pretrained" in inspect.signature(builder).parameters


BACKBONE_ENTRIES = {
    # name: (builder of the original network, exits after, final features, what it is)
    "tv_resnet18": (_torchvision_model("resnet18"), ["layer1", "layer2", "layer3"], "layer4",
                    "torchvision's ResNet-18"),
    "tv_resnet50": (_torchvision_model("resnet50"), ["layer1", "layer2", "layer3"], "layer4",
                    "torchvision's ResNet-50"),
    "tv_mobilenet_v3_small": (_torchvision_model("mobilenet_v3_small"), ["features.3", "features.8"],
                              "features.12", "torchvision's MobileNetV3-Small"),
    "tv_mobilenet_v3_large": (_torchvision_model("mobilenet_v3_large"), ["features.6", "features.12"],
                              "features.16", "torchvision's MobileNetV3-Large"),
    "timm_efficientnet_b0": (_timm_model("efficientnet_b0"), ["blocks.2", "blocks.4"], "bn2",
                             "timm's EfficientNet-B0"),
}

for _entry, (_build, _after, _end, _source) in BACKBONE_ENTRIES.items():
    register_model(_backbone_entry(_entry, _build, _after, _end, _source))


def import_model_modules(names: str | None = None) -> None:
    """Import the modules that register your own entries (`@register_model` builders, usually over
    `attach_exits`): `names`, else the comma-separated `EE_MODEL_MODULES`, so that training, export
    and evaluation, which rebuild a checkpoint's model by name, find them."""
    names = os.environ.get("EE_MODEL_MODULES", "") if names is None else names
    for module_name in filter(None, (part.strip() for part in names.split(","))):
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise UserError(f"cannot import model module {module_name!r} (EE_MODEL_MODULES): {error}") from None


import_model_modules()
