"""Decoding uploaded images for `/v1/classify`.

An upload (PNG, JPEG or any format Pillow reads, of any size) is converted to
RGB, centre-cropped to a square and resized to the model's input size with
bilinear filtering, giving a uint8 HWC array; the dataplane then normalises it
with the manifest's mean and std, exactly as training did.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidImage
from serving.normalisation import normalise_uint8  # noqa: F401  (the dataplane's import)

MAX_PIXELS = 64_000_000  # refuse decompression bombs early


def decode_image(content: bytes, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if not content:
        raise InvalidImage("empty file")
    try:
        with Image.open(io.BytesIO(content)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise InvalidImage(f"image of {image.width}x{image.height} pixels is too large")
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidImage(f"not a readable image ({error.__class__.__name__})") from None
