"""Divide and co-training (Zhao et al., 2020) served as an anytime ensemble.

`divide("mwresnet32_4", 2)` builds two small copies of a registry network, each with its
width scaled by 1/sqrt(S) so that the members together cost about what the original costs.
They are co-trained: each member sees its own augmentation of the batch, learns from the
labels (cross-entropy) and agrees with the others through a generalised Jensen-Shannon
divergence whose weight warms up linearly (`CoTrainingLoss`).

For serving, the members become the stages of one `MultiExitNet`: stage k runs member k on
the image and adds its softmax to a running sum; exit k answers with the average of members
0..k (as logits: the log of the averaged probabilities). So an easy image leaves after one
member, a hard one gets the whole ensemble, and nothing in export or the gateway changes:
the tensor that crosses each stage boundary is the image itself plus the running sum of
probabilities, packed into one row per sample (C*H*W + classes floats), which is exactly
what the next stage needs. The per-exit model of the last exit holds every member in one
graph with no dependencies between them, so ONNX Runtime may run them in parallel.

Registry names: any entry with a `_split<S>` suffix, e.g. `mwresnet20_3_split2`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from training.models import ExitSpec, MultiExitNet, _trunk_until

SPLIT_SUFFIX = re.compile(r"^(?P<base>.+)_split(?P<splits>\d+)$")
# The seed's defaults for the agreement term (its kl_weight / warm-up options).
DEFAULT_AGREEMENT_WEIGHT = 0.5
DEFAULT_WARMUP_EPOCHS = 40


def parse_split_name(name: str) -> tuple[str, int] | None:
    """"mwresnet20_3_split2" -> ("mwresnet20_3", 2); None for a name without the suffix."""
    match = SPLIT_SUFFIX.match(name)
    return (match["base"], int(match["splits"])) if match else None


def member_width(width: int, splits: int) -> int:
    """Width of each of `splits` members: parameters and MACs scale with width squared."""
    return max(1, round(width / math.sqrt(splits)))


class _Pack(nn.Module):
    """Image -> [N, C*H*W + classes]: the image and a zero running sum of probabilities."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return torch.cat([flat, flat.new_zeros(flat.shape[0], self.classes)], dim=1)


class MemberStage(nn.Module):
    """One ensemble stage: member on the unpacked image, its softmax added to the sum."""

    def __init__(self, member: MultiExitNet, input_size: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        self.member, self.input_size, self.classes = member, input_size, classes

    def member_logits(self, images: torch.Tensor) -> torch.Tensor:
        last = len(self.member.segments) - 1
        return self.member.heads[last](_trunk_until(self.member, last, images))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        pixels = packed.shape[1] - self.classes
        images = packed[:, :pixels].reshape(-1, *self.input_size)
        total = packed[:, pixels:] + F.softmax(self.member_logits(images), dim=1)
        return torch.cat([packed[:, :pixels], total], dim=1)


class EnsembleReadout(nn.Module):
    """Exit k: log of the average probability of the first `members` members."""

    def __init__(self, members: int, classes: int) -> None:
        super().__init__()
        self.members, self.classes = members, classes

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        average = packed[:, -self.classes:] / self.members
        return torch.log(average.clamp_min(1e-12))


class AnytimeEnsemble(MultiExitNet):
    """A MultiExitNet whose stages are co-trained members; exit k averages members 0..k."""

    def member_logits(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each member's own logits on its own view of the batch (for co-training)."""
        if len(views) != len(self.segments):
            raise ValueError(f"{len(views)} views for {len(self.segments)} members")
        return [stage.member_logits(view) for stage, view in zip(self.segments, views)]

    def parallel_branches(self, index: int) -> int:
        """Members in exit `index`'s per-exit model: independent, so they may run at once."""
        return index + 1


def divide(base: str, splits: int, num_classes: int = 10, width: int = 16, **kwargs) -> AnytimeEnsemble:
    """S members of registry network `base`, width scaled by 1/sqrt(S), as an anytime ensemble."""
    from training.models import create_model

    if splits < 2:
        raise UserError(f"a split needs at least 2 members, got {splits}")
    members = []
    for _ in range(splits):
        member = create_model(base, num_classes=num_classes, width=member_width(width, splits), **kwargs)
        for index in range(len(member.heads) - 1):  # members answer from their final exit only
            member.heads[index] = nn.Identity()
        members.append(member)
    input_size = members[0].input_size
    segments = [MemberStage(member, input_size, num_classes) for member in members]
    heads = [EnsembleReadout(k + 1, num_classes) for k in range(splits)]
    final_depth = members[0].exits[-1].depth
    # Depth of exit k: the layers a sample has gone through, members back to back.
    exits = [ExitSpec(index=k, depth=final_depth * (k + 1), block=k + 1) for k in range(splits)]
    return AnytimeEnsemble(f"{base}_split{splits}", _Pack(num_classes), segments, heads, exits,
                           num_classes, input_size)


def jensen_shannon(probabilities: list[torch.Tensor]) -> torch.Tensor:
    """Generalised JS divergence of S distributions: H(mean p) - mean H(p_i), batch-averaged."""
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)

    mean = torch.stack(probabilities).mean(dim=0)
    return (entropy(mean) - torch.stack([entropy(p) for p in probabilities]).mean(dim=0)).mean()


class CoTrainingLoss:
    """Sum of the members' cross-entropies + weight(epoch) x JS agreement, the weight
    warming up linearly over `warmup_epochs` (0: full weight from the start)."""

    def __init__(self, weight: float = DEFAULT_AGREEMENT_WEIGHT, warmup_epochs: int = DEFAULT_WARMUP_EPOCHS) -> None:
        self.weight, self.warmup_epochs = weight, warmup_epochs

    def weight_at(self, epoch: float) -> float:
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, epoch / self.warmup_epochs)

    def __call__(self, member_logits: list[torch.Tensor], targets: torch.Tensor, epoch: float) -> torch.Tensor:
        loss = sum(F.cross_entropy(logits, targets) for logits in member_logits)
        weight = self.weight_at(epoch)
        if weight > 0:
            loss = loss + weight * jensen_shannon([F.softmax(logits, dim=1) for logits in member_logits])
        return loss
