"""Fixtures: small datasets in every supported format, generated per session."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog", "ship")


def _class_images(rng: np.random.Generator, label: int, count: int, size: int = 32) -> np.ndarray:
    """Images whose class is learnable: a class-coloured square on noise."""
    images = rng.integers(0, 80, size=(count, size, size, 3), dtype=np.uint8)
    images[:, 8:24, 8:24, label] = 220
    return images


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory) -> Path:
    """`root/{train,test}/<class>/*.png` with 40 train and 10 test images per class."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 10)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(_class_images(rng, label, count)):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def imagefolder_tar(imagefolder, tmp_path_factory) -> Path:
    archive = tmp_path_factory.mktemp("tar") / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(imagefolder / split, arcname=split)
    return archive


@pytest.fixture(scope="session")
def cifar10_pickles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)

    def batch(count):
        labels = rng.integers(0, 3, size=count).tolist()
        data = np.concatenate([_class_images(rng, label, 1) for label in labels])
        return {b"data": data.transpose(0, 3, 1, 2).reshape(count, -1), b"labels": labels}

    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": list(CLASSES)}))
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(8)))
    (root / "test_batch").write_bytes(pickle.dumps(batch(6)))
    return root


@pytest.fixture(scope="session")
def svhn_mat(tmp_path_factory) -> Path:
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("svhn")
    rng = np.random.default_rng(2)
    for split, count in (("train", 12), ("test", 5)):
        images = rng.integers(0, 255, size=(32, 32, 3, count), dtype=np.uint8)
        labels = np.arange(1, count + 1).reshape(-1, 1) % 10 + (np.arange(count).reshape(-1, 1) == 9) * 10
        savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels.astype(np.uint8)})
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep dataset caches of tests out of the user's cache directory."""
    monkeypatch.setenv("EE_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("training.datasets.DEFAULT_CACHE_DIR", tmp_path / "cache")


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root and capture its output."""
    merged = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=merged,
                          capture_output=True, text=True, timeout=timeout)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
