"""Batched tensor transforms: normalisation and CIFAR augmentation on whole batches.

Augmenting a uint8 batch in a few tensor ops keeps 2 CPU cores on the model
rather than on per-image Python transforms.
"""

from __future__ import annotations

import numpy as np
import torch


def to_normalized(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, scaled to 0..1 then normalised."""
    batch = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return batch.sub_(mean_t).div_(std_t)


def augment(batch: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Zero-pad by `padding`, random crop back to size, random horizontal flip."""
    n, _, height, width = batch.shape
    padded = torch.nn.functional.pad(batch, (padding,) * 4)
    device = batch.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    rows = (top.view(n, 1) + torch.arange(height, device=device).view(1, height)).view(n, 1, height, 1)
    cols = (left.view(n, 1) + torch.arange(width, device=device).view(1, width)).view(n, 1, 1, width)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    batch_index = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel_index = torch.arange(batch.shape[1], device=device).view(1, -1, 1, 1)
    return padded[batch_index, channel_index, rows, cols]
