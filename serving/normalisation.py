"""Raw images to the network's input: the one implementation, used by the gateway
(serving.preprocess, serving.dataplane) and by the `<model>_cascade` Triton model,
beside whose model.py the repository writer copies this file verbatim. So it
imports nothing but numpy (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import numpy as np


def normalise_uint8(images: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 scaled to 0..1 and normalised, as in training."""
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    array = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray((array - mean) / std, dtype=np.float32)
