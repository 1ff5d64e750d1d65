import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from training.datasets import channel_stats, detect_format, heldout_split, load_split
from training.transforms import apply_cutout, augment, to_normalized

from .conftest import CLASSES


def test_imagefolder_directory_and_tarball_give_the_same_arrays(imagefolder, imagefolder_tar, tmp_path):
    from_dir = load_split(imagefolder, "train", cache_dir=tmp_path)
    from_tar = load_split(imagefolder_tar, "train", cache_dir=tmp_path)
    assert from_dir.images.shape == (120, 32, 32, 3) and from_dir.images.dtype == np.uint8
    assert from_dir.classes == CLASSES
    np.testing.assert_array_equal(from_dir.images, from_tar.images)
    np.testing.assert_array_equal(from_dir.labels, from_tar.labels)
    assert np.bincount(from_dir.labels).tolist() == [40, 40, 40]
    assert len(load_split(imagefolder_tar, "test", cache_dir=tmp_path)) == 30


def test_decoded_arrays_are_cached_once(imagefolder_tar, tmp_path):
    first = load_split(imagefolder_tar, "test", cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1
    second = load_split(imagefolder_tar, "test", cache_dir=tmp_path)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.classes == first.classes


def test_the_default_cache_is_the_one_ee_data_cache_names_at_call_time(imagefolder_tar, tmp_path, monkeypatch):
    for name in ("first", "second"):
        monkeypatch.setenv("EE_DATA_CACHE", str(tmp_path / name))
        load_split(imagefolder_tar, "test")
        assert len(list((tmp_path / name).glob("*.npz"))) == 1


def test_cifar_pickles(cifar10_pickles, tmp_path):
    assert detect_format(cifar10_pickles) == "cifar"
    train = load_split(cifar10_pickles, "train", cache_dir=tmp_path)
    test = load_split(cifar10_pickles, "test", cache_dir=tmp_path)
    assert train.images.shape == (40, 32, 32, 3) and len(test) == 6
    assert train.classes == CLASSES
    # The class colour square survives the CHW -> HWC conversion.
    sample, label = train.images[0], train.labels[0]
    assert sample[16, 16, label] == 220


def test_svhn_mat_maps_label_10_to_0(svhn_mat, tmp_path):
    train = load_split(svhn_mat, "train", cache_dir=tmp_path)
    assert train.images.shape == (12, 32, 32, 3)
    assert set(train.labels.tolist()) <= set(range(10)) and 0 in train.labels
    assert len(load_split(svhn_mat / "test_32x32.mat", "test", cache_dir=tmp_path)) == 5


def test_resizes_to_requested_size(imagefolder, tmp_path):
    assert load_split(imagefolder, "test", image_size=16, cache_dir=tmp_path).images.shape[1:] == (16, 16, 3)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_split(tmp_path / "missing", "train")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a dataset")
    with pytest.raises(UserError, match="cannot tell the format"):
        load_split(junk, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no train images"):
        load_split(empty, "train", cache_dir=None)


def test_heldout_split_is_fixed_by_seed_and_disjoint():
    train, held = heldout_split(100, 10, seed=3)
    again_train, again_held = heldout_split(100, 10, seed=3)
    np.testing.assert_array_equal(held, again_held)
    np.testing.assert_array_equal(train, again_train)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert not np.array_equal(held, heldout_split(100, 10, seed=4)[1])
    with pytest.raises(UserError):
        heldout_split(10, 10, seed=0)


def test_normalisation_and_augmentation():
    images = np.full((4, 8, 8, 3), 255, np.uint8)
    batch = to_normalized(images, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert batch.shape == (4, 3, 8, 8)
    torch.testing.assert_close(batch, torch.ones(4, 3, 8, 8))
    augmented = augment(batch, torch.Generator().manual_seed(0), padding=2)
    assert augmented.shape == batch.shape
    # Crops of a constant image only ever let in zero padding.
    assert set(augmented.unique().tolist()) <= {0.0, 1.0}
    mean, std = channel_stats(images)
    assert mean == [1.0, 1.0, 1.0] and std == [0.0, 0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalisation_and_augmentation_stay_on_the_gpu():
    """The training set lives on the GPU there: the mean and std follow the batch (a CUDA run once
    failed on CPU constants)."""
    images = torch.zeros((2, 4, 4, 3), dtype=torch.uint8, device="cuda")
    batch = to_normalized(images, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert batch.device.type == "cuda" and torch.allclose(batch, torch.full_like(batch, -2.0))
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert augment(batch, generator, cutout=2).device.type == "cuda"


def test_cutout_zeroes_one_clipped_square_per_image_in_every_channel():
    batch = torch.ones(256, 3, 32, 32)
    out = apply_cutout(batch, torch.Generator().manual_seed(0), 16)
    zeroed = out == 0
    # The same pixels in every channel, and nothing else changed.
    assert torch.equal(zeroed.all(1), zeroed.any(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for mask in zeroed[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 16 and 1 <= len(cols) <= 16
        # A rectangle: every row and column it spans is fully zeroed inside its bounds.
        assert int(mask.sum()) == len(rows) * len(cols)
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    counts = zeroed[:, 0].sum((1, 2))
    assert counts.max() == 256 and counts.min() < 256  # whole squares inside, clipped at borders
    # Off by default: augment leaves a constant image to crops of it and padding.
    plain = augment(batch, torch.Generator().manual_seed(0), padding=0)
    torch.testing.assert_close(plain, batch)
    assert (augment(batch, torch.Generator().manual_seed(0), padding=0, cutout=8) == 0).any()


def _folder(root, sizes_and_modes):
    for i, (size, mode) in enumerate(sizes_and_modes):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).convert(mode).save(folder / f"{i}.png")
    return root


def test_size_and_channels_come_from_the_data(tmp_path):
    gray = _folder(tmp_path / "gray", [((28, 28), "L")] * 4)
    split = load_split(gray, "train", cache_dir=None)
    assert split.images.shape == (4, 28, 28, 1) and split.input_size == (1, 28, 28)
    assert load_split(gray, "train", image_size=32, channels=3, cache_dir=None).images.shape == (4, 32, 32, 3)
    mixed = _folder(tmp_path / "mixed", [((20, 30), "L"), ((20, 30), "RGB")])
    images = load_split(mixed, "train", cache_dir=None).images  # one colour image: all RGB, as Pillow converts
    assert images.shape == (2, 20, 30, 3) and (images[0, :, :, 0] == images[0, :, :, 2]).all()
    colour = load_split(mixed, "train", channels=1, cache_dir=None).images
    assert colour.shape == (2, 20, 30, 1)
    sizes = _folder(tmp_path / "sizes", [((28, 28), "L"), ((30, 30), "L")])
    with pytest.raises(UserError, match="2 different sizes.*--image-size"):
        load_split(sizes, "train", cache_dir=None)
    assert load_split(sizes, "train", image_size=(16, 24), cache_dir=None).images.shape == (2, 16, 24, 1)


def test_cifar_and_svhn_convert_to_the_requested_channels_and_size(cifar10_pickles, svhn_mat, tmp_path):
    train = load_split(cifar10_pickles, "train", channels=1, image_size=28, cache_dir=tmp_path)
    assert train.images.shape == (40, 28, 28, 1)
    assert load_split(svhn_mat, "train", channels=1, cache_dir=tmp_path).images.shape == (12, 32, 32, 1)


def test_the_cache_key_names_the_size_and_the_centred_crop(imagefolder_tar, tmp_path):
    """RGB at a square size keeps the key's old form, with the crop named since resized images are
    cropped to the size's aspect ratio (caches of stretched images are not reused)."""
    from training.datasets import _cache_path

    explicit = _cache_path(tmp_path, imagefolder_tar, "test", "imagefolder", (32, 32), 3)
    assert explicit.name.endswith(".npz") and explicit != _cache_path(tmp_path, imagefolder_tar, "test",
                                                                        "imagefolder", None, None)
    import hashlib

    stat = imagefolder_tar.stat()
    key = f"{imagefolder_tar.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|test|imagefolder|32|centre-box"
    assert hashlib.sha256(f"1|{key}".encode()).hexdigest()[:16] in explicit.name


def test_resized_images_are_cropped_to_the_aspect_ratio_as_the_gateway_crops_uploads(tmp_path):
    """A training image of another aspect ratio than `image_size` becomes exactly what the gateway makes of
    the same file uploaded to /v1/classify: the centred box of the size's ratio, then the resize."""
    from serving.preprocess import decode_image
    rng = np.random.default_rng(0)
    folder = tmp_path / "wide" / "train" / "a"
    folder.mkdir(parents=True)
    picture = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    picture[:, :15] = (255, 0, 0)  # a red band on the left that a square crop of the centre leaves out
    Image.fromarray(picture).save(folder / "0.png")
    for size in ((20, 20), (16, 24), (24, 16)):
        loaded = load_split(tmp_path / "wide", "train", image_size=size, cache_dir=None).images[0]
        served = decode_image((folder / "0.png").read_bytes(), size)
        np.testing.assert_array_equal(loaded, served)
    square = load_split(tmp_path / "wide", "train", image_size=20, cache_dir=None).images[0]
    assert not (square[:, :2] == (255, 0, 0)).all(axis=-1).any()  # the band is cropped away, not squashed in
