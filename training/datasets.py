"""Image-classification datasets decoded once into cached uint8 arrays.

Sources: image-folder trees (`<root>/<split>/<class>/*.jpg|png`), `.tar.gz`
archives of such trees, CIFAR-10/100 python pickles (directory or archive) and
SVHN `.mat` files. Every source becomes a `Split`: an (N, H, W, C) uint8 array
and int64 labels, cached as `.npz` so JPEG decoding happens once.

Size and channels come from the data unless asked for: grayscale images stay one
channel (C = 1; any colour image makes the whole split RGB, C = 3), and images keep
their size when they all share one. `image_size` and `channels` override both.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from common.errors import UserError
from common.images import centre_box

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_VERSION = 1
FORMATS = ("auto", "imagefolder", "cifar", "svhn")
CHANNELS = (1, 3)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes that decode to one channel


def default_cache_dir() -> Path:
    """`EE_DATA_CACHE` as it is set now, else `~/.cache/early-exit`."""
    return Path(os.environ.get("EE_DATA_CACHE") or Path.home() / ".cache" / "early-exit")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, C = 1 (grayscale) or 3 (RGB)
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        return Split(self.images[indices], self.labels[indices], self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W): the network input these images make."""
        _, height, width, channels = self.images.shape
        return channels, height, width


ImageSize = int | tuple[int, int] | None  # None: the data's own; an int: square


def _size_tuple(image_size: ImageSize) -> tuple[int, int] | None:
    if image_size is None:
        return None
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height < 1 or width < 1:
        raise UserError(f"image size must be positive, got {image_size}")
    return int(height), int(width)


def load_split(
    source: str | Path,
    split: str,
    data_format: str = "auto",
    image_size: ImageSize = None,
    channels: int | None = None,
    cache_dir: Path | None | Literal["default"] = "default",
) -> Split:
    """Load `split` ("train" or "test") of a dataset, decoding at most once.

    `image_size` (an int for square images, or (height, width)) resizes every image
    (bilinear), cropped first to the largest centred box of the size's aspect ratio, as the
    gateway does with uploads (`common.images.centre_box`); None keeps the data's own size, which all images must share.
    `channels` (1 or 3) converts every image to grayscale or RGB; None takes it from the
    data: 1 if every image is grayscale, else 3.
    Decoded arrays are cached in `cache_dir`: by default `default_cache_dir()`,
    read at each call; None turns the cache off.
    """
    path = Path(source)
    if not path.exists():
        raise UserError(f"dataset not found: {path}")
    if data_format not in FORMATS:
        raise UserError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use train or test")
    if channels is not None and channels not in CHANNELS:
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    size = _size_tuple(image_size)
    data_format = detect_format(path) if data_format == "auto" else data_format
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    cache_file = _cache_path(cache_dir, path, split, data_format, size, channels)
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as cached:
            return Split(cached["images"], cached["labels"], tuple(_names(cached["classes"].tolist())))
    loader = {"imagefolder": _load_imagefolder, "cifar": _load_cifar, "svhn": _load_svhn}
    result = loader[data_format](path, split, size, channels)
    if len(result) == 0:
        raise UserError(f"no {split} images found in {path} (format {data_format})")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")  # ranks race
        np.savez(temporary, images=result.images, labels=result.labels,
                 classes=np.array(result.classes))
        os.replace(temporary, cache_file)
    return result


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".mat") or (path.is_dir() and any(path.glob("*_32x32.mat"))):
        return "svhn"
    if path.is_dir():
        if (path / "batches.meta").exists() or (path / "meta").exists():
            return "cifar"
        for child in ("cifar-10-batches-py", "cifar-100-python"):
            if (path / child).is_dir():
                return "cifar"
        return "imagefolder"
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if base in ("batches.meta", "meta", "data_batch_1"):
                    return "cifar"
                if base.lower().endswith(IMAGE_SUFFIXES):
                    return "imagefolder"
    raise UserError(
        f"cannot tell the format of {path}: expected an image-folder tree or .tar.gz, "
        "CIFAR python pickles, or SVHN .mat (pass --data-format)"
    )


def load_split_for_model(source: str | Path, split: str, input_size, data_format: str = "auto",
                         cache_dir: Path | None | Literal["default"] = "default") -> Split:
    """`split` as a network of `input_size` (C, H, W) takes it: resized and converted to match."""
    channels, height, width = input_size
    return load_split(source, split, data_format, image_size=(height, width), channels=channels,
                      cache_dir=cache_dir)


def _cache_path(cache_dir, path: Path, split: str, data_format: str, size: tuple[int, int] | None,
                channels: int | None) -> Path | None:
    if cache_dir is None:
        return None
    stat = path.stat()
    if size is not None and size[0] == size[1] and channels == 3:
        shape = str(size[0])  # the key of RGB at one square size, as caches before channels were chosen
    else:
        shape = f"{'x'.join(map(str, size)) if size else 'native'}-c{channels or 'auto'}"
    if size is not None:
        shape += "|centre-box"  # resized images are cropped to the size's aspect ratio first (2026-12-02)
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{split}|{data_format}|{shape}"
    digest = hashlib.sha256(f"{CACHE_VERSION}|{key}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{path.name}-{split}-{digest}.npz"


def _decode_image(data: bytes | Path, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """(H, W, C) uint8: grayscale images as one channel unless `channels` is 3, colour as RGB."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        gray = channels == 1 or (channels is None and image.mode in GRAY_MODES)
        image = image.convert("L" if gray else "RGB")
        if size is not None and image.size != (size[1], size[0]):  # as the gateway does with uploads
            image = image.crop(centre_box(image.width, image.height, size[1], size[0]))
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array


def _stack(images: list[np.ndarray], labels: list[int], classes, where: object = "") -> Split:
    """One array of the decoded images: a grayscale image among colour ones becomes RGB (as Pillow
    converts it); differing sizes are an error naming them (give an image size)."""
    if not images:
        return Split(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64), tuple(classes))
    if len({image.shape[2] for image in images}) > 1:
        images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4])
        raise UserError(f"images in {where} have {len(sizes)} different sizes ({shown}...): "
                        "give an image size (--image-size) to resize them to one")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))


def _load_imagefolder(path: Path, split: str, size: tuple[int, int] | None, channels: int | None) -> Split:
    """`<root>/<split>/<class>/<image>`; classes are the sorted class folder names."""
    if path.is_dir():
        files = [p for p in (path / split).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES]
        entries = sorted((p.parent.name, p.name, p) for p in files)
        classes = sorted({cls for cls, _, _ in entries})
        index = {cls: i for i, cls in enumerate(classes)}
        images = [_decode_image(p, size, channels) for _, _, p in entries]
        return _stack(images, [index[cls] for cls, _, _ in entries], classes, path / split)
    entries = []
    with tarfile.open(path) as archive:
        for member in archive:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
                continue
            if parts[-3] != split:
                continue
            data = archive.extractfile(member).read()
            entries.append((parts[-2], parts[-1], _decode_image(data, size, channels)))
    entries.sort(key=lambda entry: entry[:2])
    classes = sorted({cls for cls, _, _ in entries})
    index = {cls: i for i, cls in enumerate(classes)}
    return _stack([e[2] for e in entries], [index[e[0]] for e in entries], classes, f"{path} ({split})")


def _load_cifar(path: Path, split: str, size: tuple[int, int] | None, channels: int | None) -> Split:
    """CIFAR-10 (`data_batch_*`, `test_batch`) or CIFAR-100 (`train`, `test`) pickles."""
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for file in path.rglob("*"):
            if file.is_file():
                blobs[file.name] = file.read_bytes()
    else:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    blobs[member.name.rsplit("/", 1)[-1]] = archive.extractfile(member).read()
    if "batches.meta" in blobs:  # CIFAR-10
        classes = _names(_unpickle(blobs["batches.meta"])["label_names"])
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    elif "meta" in blobs:  # CIFAR-100
        classes = _names(_unpickle(blobs["meta"])["fine_label_names"])
        names, label_key = [split], "fine_labels"
    else:
        raise UserError(f"{path} holds no CIFAR batches.meta or meta file")
    images, labels = [], []
    for name in names:
        if name not in blobs:
            continue
        batch = _unpickle(blobs[name])
        images.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch[label_key])
    if not images:
        return _stack([], [], classes)
    array = _conform(np.concatenate(images), size, channels)
    return Split(array, np.asarray(labels, np.int64), tuple(classes))


def _load_svhn(path: Path, split: str, size: tuple[int, int] | None, channels: int | None) -> Split:
    """SVHN cropped digits: `train_32x32.mat` / `test_32x32.mat` (label 10 means 0)."""
    from scipy.io import loadmat

    file = path / f"{split}_32x32.mat" if path.is_dir() else path
    if path.is_file() and not path.name.startswith(split):
        sibling = path.with_name(f"{split}_32x32.mat")
        if not sibling.exists():
            raise UserError(f"SVHN {split} file not found next to {path}: {sibling.name}")
        file = sibling
    if not file.exists():
        raise UserError(f"SVHN file not found: {file}")
    content = loadmat(file)
    images = np.asarray(content["X"], np.uint8).transpose(3, 0, 1, 2)
    labels = np.asarray(content["y"], np.int64).reshape(-1) % 10
    return Split(_conform(images, size, channels), labels, tuple(str(d) for d in range(10)))


def _conform(images: np.ndarray, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """RGB (N, H, W, 3) images at the requested size and channels (Pillow's centred crop to the size's
    aspect ratio, resize and conversion)."""
    if (size is None or images.shape[1:3] == size) and channels in (None, 3):
        return np.ascontiguousarray(images)
    converted = []
    for image in images:
        picture = Image.fromarray(image)
        if channels == 1:
            picture = picture.convert("L")
        if size is not None and picture.size != (size[1], size[0]):
            picture = picture.crop(centre_box(picture.width, picture.height, size[1], size[0]))
            if picture.size != (size[1], size[0]):
                picture = picture.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(picture, dtype=np.uint8)
        converted.append(array[:, :, None] if array.ndim == 2 else array)
    return np.stack(converted)


def _names(names) -> list[str]:
    """Class names as str: files pickled by Python 3 may hold them as bytes (the originals are Python 2 str)."""
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


def _unpickle(blob: bytes) -> dict:
    content = pickle.loads(blob, encoding="latin1")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}


def heldout_split(num_train: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) carved from the training set with a fixed seed."""
    if not 0 <= size < num_train:
        raise UserError(f"held-out size {size} must be in [0, {num_train})")
    order = np.random.default_rng(seed).permutation(num_train)
    return np.sort(order[size:]), np.sort(order[:size])


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in the 0..1 range."""
    scaled = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return scaled.mean(axis=0).round(4).tolist(), scaled.std(axis=0).round(4).tolist()
