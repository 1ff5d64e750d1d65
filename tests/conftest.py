"""Fixtures: small datasets in every supported format, generated per session."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.paths import REPO_ROOT

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


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_cache(tmp_path_factory):
    """Keep the dataset caches of session fixtures out of the user's cache directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EE_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test (and the processes it starts) caches decoded datasets in its own directory."""
    monkeypatch.setenv("EE_DATA_CACHE", str(tmp_path / "cache"))


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root and capture its output."""
    merged = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=merged,
                          capture_output=True, text=True, timeout=timeout)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_tiny_checkpoint(imagefolder: Path, path: Path, model: str = "mwresnet8_3", seed: int = 0,
                         **model_kwargs) -> Path:
    """A small registry model (width 4 unless given) with real BatchNorm statistics from one
    train-mode pass over `imagefolder`, saved as a checkpoint that records `model_kwargs`."""
    import torch

    from training.checkpoint import build_metadata, save_checkpoint
    from training.datasets import channel_stats, load_split
    from training.models import create_model
    from training.transforms import to_normalized

    model_kwargs.setdefault("width", 4)
    torch.manual_seed(seed)
    network = create_model(model, num_classes=len(CLASSES), **model_kwargs)
    train = load_split(imagefolder, "train", cache_dir=None)
    mean, std = channel_stats(train.images)
    network.train()
    with torch.no_grad():  # a forward pass in train mode fills the BatchNorm running statistics
        network(to_normalized(train.images, mean, std))
    network.eval()
    meta = build_metadata(network, classes=train.classes, mean=mean, std=std,
                          heldout={"seed": 0, "size": 30, "source": str(imagefolder), "num_train": len(train)},
                          training={"model_kwargs": model_kwargs},
                          heldout_acc=[round(0.4 + 0.1 * k, 2) for k in range(len(network.exits))])
    save_checkpoint(path, network, meta)
    return path


def export_tiny(checkpoint: Path, repository: Path, model_name: str | None = None):
    """`checkpoint` exported (python backend, every exit, 30 validation images) into `repository`."""
    from export.pipeline import ExportOptions, export_checkpoint

    return export_checkpoint(ExportOptions(checkpoint=checkpoint, output=repository, validation_images=30,
                                           model_name=model_name), log=lambda message: None)


@pytest.fixture(scope="session")
def tiny_checkpoint(imagefolder, tmp_path_factory) -> Path:
    """A small mwresnet8_3 with real BatchNorm statistics, saved as a checkpoint."""
    return save_tiny_checkpoint(imagefolder, tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (python backend, all exits) into a repository."""
    output = tmp_path_factory.mktemp("repo") / "model_repository"
    export_tiny(tiny_checkpoint, output)
    return output


def triton_required() -> bool:
    return os.environ.get("EE_REQUIRE_TRITON") == "1"


@pytest.fixture(scope="session")
def triton_venv() -> Path:
    from benchmarks.triton_launcher import DEFAULT_VENV

    if not (DEFAULT_VENV / "bin").exists():
        if triton_required():
            pytest.fail(f"EE_REQUIRE_TRITON=1 but no Triton virtualenv at {DEFAULT_VENV} (make triton)")
        pytest.skip(f"no Triton virtualenv at {DEFAULT_VENV}: run `make triton`")
    return DEFAULT_VENV


def GatewayProcess(repository: Path, *extra: str, log_path: Path | None = None):
    """The gateway as a real process on free loopback ports (ready when it returns)."""
    from benchmarks.servers import GatewayServer

    return GatewayServer(repository, *extra, log_path=log_path)


# Several models (tests/test_multi_model.py, tests/test_model_versions.py) ----------------------------
@pytest.fixture(scope="module")
def other_checkpoint(imagefolder, tmp_path_factory):
    """A second tiny mwresnet8_3 checkpoint, weights from another seed."""
    from .multi_model_helpers import make_checkpoint

    return make_checkpoint(imagefolder, tmp_path_factory.mktemp("other") / "other.safetensors", seed=7)


@pytest.fixture(scope="module")
def two_models(tiny_repository, other_checkpoint, tmp_path_factory):
    """The tiny model's repository with a second model (other weights) exported into it as `tiny_b`."""
    from .multi_model_helpers import SECOND, export

    repository = tmp_path_factory.mktemp("two") / "model_repository"
    shutil.copytree(tiny_repository, repository)
    export(other_checkpoint, repository, SECOND)
    return repository
