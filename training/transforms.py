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
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return batch.sub_(mean_t).div_(std_t)


def augment(batch: torch.Tensor, generator: torch.Generator, padding: int = 4, cutout: int = 0) -> torch.Tensor:
    """Zero-pad by `padding`, random crop back to size, random horizontal flip,
    then (if `cutout` > 0) zero one `cutout`-sized square per image (Cutout)."""
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
    cropped = padded[batch_index, channel_index, rows, cols]
    return apply_cutout(cropped, generator, cutout) if cutout > 0 else cropped


def apply_cutout(batch: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): zero a size x size square at a random centre
    in each image; squares near the border are clipped, as in the paper. Zero is the
    mean colour, since batches are normalised before augmentation."""
    n, _, height, width = batch.shape
    device = batch.device
    centre_y = torch.randint(0, height, (n, 1, 1, 1), generator=generator, device=device)
    centre_x = torch.randint(0, width, (n, 1, 1, 1), generator=generator, device=device)
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)
    low = size // 2
    inside = ((rows >= centre_y - low) & (rows < centre_y - low + size)
              & (cols >= centre_x - low) & (cols < centre_x - low + size))
    return batch.masked_fill(inside, 0.0)
