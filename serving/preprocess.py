"""Decoding uploaded images for `/v1/classify` (called in a worker pool, never on the event loop).

An upload (PNG, JPEG, WebP, GIF or BMP, up to a limit of pixels) is converted to
the model's channels (RGB, or Pillow's grayscale "L" for a one-channel model),
centre-cropped to the model's aspect ratio (the largest centred box of the input's
H:W: a square for a square model) and resized to the model's input size with
bilinear filtering, giving a uint8 HWC array; the dataplane then normalises it
with the manifest's mean and std, exactly as training did.
"""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
from PIL import BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

from common.images import centre_box
from serving.errors import InvalidImage
from serving.normalisation import normalise_uint8  # noqa: F401  (the dataplane's import)

MAX_PIXELS = 16_777_216  # default limit of one image's declared pixels (4096 x 4096): refuses bombs early
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow may parse: no exotic decoders on hostile input
UNREADABLE = "not a readable image (PNG, JPEG, WebP, GIF or BMP)"


# The plugins of FORMATS, imported above, are all Pillow may use: imported once at start-up (not on the
# first upload: Pillow's preinit took ~35 ms here), and Image.open never falls back to importing all.


def declared_pixels(content: bytes) -> tuple[int, int]:
    """(width, height) from an upload's header alone, without decoding its pixels: cheap, so an
    oversized image (a decompression bomb: a few KB of PNG for 64 megapixels) is refused before any work."""
    with _opened(content) as image:
        return image.size


def decode_image(content: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS,
                 channels: int = 3) -> np.ndarray:
    """(H, W, channels) uint8 of an upload; `channels` 1 is Pillow's grayscale ("L"), 3 RGB."""
    height, width = size
    with _opened(content) as image:
        if image.width * image.height > max_pixels:
            raise InvalidImage(f"image of {image.width}x{image.height} pixels exceeds the limit of "
                               f"{max_pixels} pixels")
        image = image.convert("L" if channels == 1 else "RGB")
        left, top, right, bottom = centre_box(image.width, image.height, width, height)
        image = image.crop((left, top, right, bottom))
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array


@contextmanager
def _opened(content: bytes):
    """The upload opened by Pillow (accepted formats only); any Pillow failure is an InvalidImage."""
    if not content:
        raise InvalidImage("empty file")
    try:
        with Image.open(io.BytesIO(content), formats=FORMATS) as image:
            yield image
    except (InvalidImage, MemoryError):
        raise
    except Exception:  # Pillow raises many types on a hostile file (OSError, SyntaxError, struct.error, ...)
        raise InvalidImage(UNREADABLE) from None


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) uint8 images with `channels` channels: RGB to grayscale as Pillow's "L" conversion
    (ITU-R 601-2 luma, the same integer arithmetic), grayscale to RGB by repeating the channel."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        rgb = images.astype(np.uint32)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    raise InvalidImage(f"cannot convert images of {have} channels to the model's {channels}")
