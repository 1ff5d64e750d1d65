"""CIFAR-100 and SVHN as their published files lay them out, generated here (the real files are not in the
shared data): the loaders read them pixel for pixel, and a tiny training run and its evaluation go through
`python -m training.train --data-format cifar|svhn` and `training.evaluate`.

Layouts reproduced:
- `cifar-100-python.tar.gz`: `cifar-100-python/{meta,train,test,file.txt~}`, Python 2 cPickle files (keys and
  names are Python 2 `str`, so Python 3 reads them with `encoding="latin1"`, or as `b'data'`... with
  `encoding="bytes"`): `data` (N, 3072) uint8 rows of 1024 red, 1024 green, 1024 blue values, `fine_labels`,
  `coarse_labels`, `filenames`, `batch_label`; `meta` holds `fine_label_names` and `coarse_label_names`.
- `cifar-10-python.tar.gz`: `cifar-10-batches-py/{batches.meta,data_batch_1..5,test_batch,readme.html}`.
- SVHN `train_32x32.mat` / `test_32x32.mat` (MATLAB v5, as `scipy.io.savemat` writes): `X` (32, 32, 3, N) uint8,
  `y` (N, 1) float64 with 10 for the digit 0.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from training.datasets import detect_format, load_split

from .conftest import run_module


class _Python2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as cPickle wrote the CIFAR files;
    numpy's raw array data goes the same way, as in those files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def python2_pickle(content: dict) -> bytes:
    """`content` with every str turned into a Python 2 str (bytes here), pickled as Python 2 did."""
    def py2(value):
        if isinstance(value, str):
            return value.encode("latin1")
        if isinstance(value, list):
            return [py2(item) for item in value]
        return value

    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({py2(key): py2(value) for key, value in content.items()})
    return buffer.getvalue()


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 noise with a label-dependent square, so the labels are learnable."""
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    for image, label in zip(images, labels):
        image[4 + label % 20:12 + label % 20, 4:28, label % 3] = 255
    return images


def _rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: all red values, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> tuple[Path, dict]:
    """cifar-100-python.tar.gz: 300 train images (3 a class), 100 test (1 a class)."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("cifar100") / "cifar-100-python.tar.gz"
    truth = {}
    with tarfile.open(path, "w:gz") as archive:
        directory = tarfile.TarInfo("cifar-100-python")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        _add(archive, "cifar-100-python/file.txt~", b"")
        _add(archive, "cifar-100-python/meta",
             python2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE}))
        for split, per_class in (("train", 3), ("test", 1)):
            fine = rng.permutation(np.repeat(np.arange(100), per_class))
            images = _images(rng, fine)
            truth[split] = (images, fine)
            _add(archive, f"cifar-100-python/{split}", python2_pickle({
                "filenames": [f"image_{i}.png" for i in range(len(fine))], "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": _rows(images)}))
    return path, truth


@pytest.fixture(scope="module")
def cifar10_tar(tmp_path_factory) -> tuple[Path, dict]:
    rng = np.random.default_rng(8)
    path = tmp_path_factory.mktemp("cifar10") / "cifar-10-python.tar.gz"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    truth = {"train": [], "test": []}
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "cifar-10-batches-py/readme.html", b"<html></html>")
        _add(archive, "cifar-10-batches-py/batches.meta",
             python2_pickle({"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = rng.integers(0, 10, size=4)
            images = _images(rng, labels)
            truth["test" if name == "test_batch" else "train"].append((images, labels))
            _add(archive, f"cifar-10-batches-py/{name}", python2_pickle({
                "batch_label": name, "labels": labels.tolist(), "data": _rows(images),
                "filenames": [f"{name}_{i}.png" for i in range(4)]}))
    return path, {split: (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
                  for split, batches in truth.items()}


@pytest.fixture(scope="module")
def svhn(tmp_path_factory) -> tuple[Path, dict]:
    """train_32x32.mat (200 images) and test_32x32.mat (60), digits 0-9 with 0 stored as 10."""
    from scipy.io import savemat

    rng = np.random.default_rng(9)
    root = tmp_path_factory.mktemp("svhn")
    truth = {}
    for split, count in (("train", 200), ("test", 60)):
        digits = np.arange(count) % 10
        images = _images(rng, digits)
        truth[split] = (images, digits)
        stored = np.where(digits == 0, 10, digits).astype(np.float64).reshape(-1, 1)
        savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": stored})
    return root, truth


def test_the_generated_cifar_files_are_python2_pickles(cifar100):
    path, _ = cifar100
    with tarfile.open(path) as archive:
        blob = archive.extractfile("cifar-100-python/train").read()
    assert set(pickle.loads(blob, encoding="bytes")) == {b"filenames", b"batch_label", b"fine_labels",
                                                          b"coarse_labels", b"data"}
    as_latin1 = pickle.loads(blob, encoding="latin1")
    assert as_latin1["data"].dtype == np.uint8 and as_latin1["data"].shape == (300, 3072)
    with pytest.raises(UnicodeDecodeError):  # Python 2 str of raw bytes: the default ASCII fails, as on the real files
        pickle.loads(blob)


def test_cifar100_archive_pixels_labels_and_fine_class_names(cifar100, tmp_path):
    path, truth = cifar100
    assert detect_format(path) == "cifar"
    for split in ("train", "test"):
        loaded = load_split(path, split, cache_dir=tmp_path)
        images, labels = truth[split]
        assert loaded.images.shape == (len(labels), 32, 32, 3) and loaded.images.dtype == np.uint8
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.classes == tuple(FINE)
    cached = load_split(path, "test", cache_dir=tmp_path)  # the cached copy reads back the same
    np.testing.assert_array_equal(cached.images, truth["test"][0])
    assert cached.classes == tuple(FINE) and all(type(name) is str for name in cached.classes)


def test_cifar_with_bytes_names_gives_str_class_names(tmp_path):
    """Files pickled by Python 3 with bytes names (as a reader with encoding="bytes" shows the real ones) load
    with str class names too: the names go into the checkpoint's JSON metadata."""
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    images = _images(np.random.default_rng(1), np.arange(4))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [n.encode() for n in FINE]}))
    (root / "test").write_bytes(pickle.dumps({b"fine_labels": [0, 1, 2, 3], b"data": _rows(images)}))
    loaded = load_split(root, "test", cache_dir=None)
    assert loaded.classes == tuple(FINE)
    np.testing.assert_array_equal(loaded.images, images)


def test_cifar10_archive(cifar10_tar, tmp_path):
    path, truth = cifar10_tar
    assert detect_format(path) == "cifar"
    for split in ("train", "test"):
        loaded = load_split(path, split, cache_dir=tmp_path)
        np.testing.assert_array_equal(loaded.images, truth[split][0])
        np.testing.assert_array_equal(loaded.labels, truth[split][1])
        assert loaded.classes[0] == "airplane" and len(loaded.classes) == 10
    assert len(load_split(path, "train", cache_dir=None)) == 20


def test_svhn_mat_files_pixels_and_digit_zero(svhn, tmp_path):
    root, truth = svhn
    assert detect_format(root) == "svhn" and detect_format(root / "test_32x32.mat") == "svhn"
    for split in ("train", "test"):
        for source in (root, root / f"{split}_32x32.mat"):
            loaded = load_split(source, split, cache_dir=None)
            np.testing.assert_array_equal(loaded.images, truth[split][0])
            np.testing.assert_array_equal(loaded.labels, truth[split][1])
            assert loaded.classes == tuple(str(d) for d in range(10))
    # the test file named for training finds its sibling
    assert len(load_split(root / "test_32x32.mat", "train", cache_dir=tmp_path)) == 200


TINY = ["--model", "mwresnet8_3", "--width", "4", "--epochs", "1", "--batch-size", "40", "--no-progress",
        "--threads", "1"]


@pytest.mark.parametrize(("dataset", "data_format", "heldout", "limit", "classes"),
                         [("cifar100", "cifar", 50, 120, 100), ("svhn", "svhn", 40, 100, 10)])
def test_train_and_evaluate_run_on_the_format(dataset, data_format, heldout, limit, classes, request, tmp_path):
    source, truth = request.getfixturevalue(dataset)
    checkpoint = tmp_path / f"{dataset}.safetensors"
    result = run_module("training.train", *TINY, "--data", str(source), "--data-format", data_format,
                        "--heldout-size", str(heldout), "--limit-train", str(limit), "--output", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1:" in result.stdout
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    assert meta["num_classes"] == classes and len(meta["classes"]) == classes
    assert meta["classes"][:2] == (["fine00", "fine01"] if dataset == "cifar100" else ["0", "1"])
    assert meta["heldout"]["size"] == heldout and meta["heldout"]["num_train"] == len(truth["train"][1])
    evaluation = run_module("training.evaluate", "--checkpoint", str(checkpoint), "--data", str(source),
                            "--threads", "1")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads(checkpoint.with_name(f"{dataset}.eval.json").read_text())
    assert report["test_size"] == len(truth["test"][1]) and report["heldout"]["size"] == heldout
    assert [row["depth"] for row in report["exits"]] == [3, 5, 8]
    assert all(0.0 <= row["test_acc"] <= 1.0 for row in report["exits"])
