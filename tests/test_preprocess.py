"""Uploads to /v1/classify: centre-cropped to the model's aspect ratio, then resized (serving.preprocess).
Real PNG files through real Pillow; a real non-square tiny model exported to real ONNX behind a real
gateway process."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from common.manifest import read_manifest
from common.onnxruntime_session import create_session
from serving.preprocess import centre_box, decode_image

from .conftest import GatewayProcess, export_tiny, png_bytes

GRAY, RED, GREEN, BLUE = (128, 128, 128), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def square_crop_before(content: bytes, size: tuple[int, int], channels: int) -> np.ndarray:
    """What decode_image did before the aspect-ratio crop: the centred square, then the resize."""
    height, width = size
    with Image.open(io.BytesIO(content)) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array


def canvas(height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GRAY
    return image


def is_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels within 40 of `colour` on every channel (bilinear edges blend into the gray)."""
    return np.all(np.abs(pixels.astype(int) - np.array(colour)) < 40, axis=-1)


@pytest.mark.parametrize("channels", [3, 1])
def test_square_models_see_exactly_what_they_saw_before(channels):
    rng = np.random.default_rng(5)
    for image_size in ((300, 200), (200, 300), (33, 57), (57, 33), (32, 32), (1, 40), (40, 1), (7, 3), (64, 65)):
        content = png_bytes(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8))
        for size in ((32, 32), (28, 28), (64, 64), (1, 1)):
            decoded = decode_image(content, size, channels=channels)
            assert decoded.shape == (*size, channels)
            assert np.array_equal(decoded, square_crop_before(content, size, channels)), (image_size, size)


def test_the_box_is_the_largest_centred_one_of_the_model_aspect_ratio():
    for image_width in (1, 2, 3, 17, 32, 100, 101, 640):
        for image_height in (1, 2, 5, 16, 33, 100, 480):
            for width, height in ((32, 16), (16, 32), (40, 24), (24, 40), (32, 32), (7, 3)):
                left, top, right, bottom = centre_box(image_width, image_height, width, height)
                box_width, box_height = right - left, bottom - top
                assert 0 <= left and 0 <= top and right <= image_width and bottom <= image_height
                assert box_width >= 1 and box_height >= 1
                # Centred: the margins on either side differ by at most a pixel.
                assert abs(left - (image_width - right)) <= 1 and abs(top - (image_height - bottom)) <= 1
                # Largest: it spans the image's full width or full height ...
                assert box_width == image_width or box_height == image_height
                # ... and its other side is the model's ratio of that, to the nearest pixel (at least 1).
                if box_height == image_height:
                    assert box_width == max(1, min(image_width, round(image_height * width / height + 1e-9)))
                else:
                    assert box_height == max(1, min(image_height, round(image_width * height / width + 1e-9)))


def test_a_wide_model_keeps_the_middle_band_of_a_square_upload():
    """A 2:1 model (16 x 32) and a 100 x 100 upload: the box is rows 25-74, every column. A blue band in
    rows 0-19 is outside it; a red bar in rows 45-54 lands mid-height; a green bar in columns 0-9 stays
    at the left edge, 10% of the width."""
    image = canvas(100, 100)
    image[0:20] = BLUE
    image[45:55] = RED
    image[:, 0:10] = GREEN
    content = png_bytes(image)
    decoded = decode_image(content, (16, 32))
    assert decoded.shape == (16, 32, 3)
    expected = Image.fromarray(image).crop((0, 25, 100, 75)).resize((32, 16), Image.BILINEAR)
    assert np.array_equal(decoded, np.asarray(expected))
    assert not is_colour(decoded, BLUE).any()  # cropped away (the square crop kept it in the top rows)
    assert is_colour(square_crop_before(content, (16, 32), 3), BLUE)[:2, 4:].all()  # (right of the green)
    red_rows = np.flatnonzero(is_colour(decoded[:, 16:], RED).all(axis=1))
    assert red_rows.tolist() == [7, 8]  # (45-25)/50*16 = 6.4 to (55-25)/50*16 = 9.6, blended edges
    # The bar's profile (red over the gray, a row's share of red in 0..1): its thickness is 10/50 of the
    # height (3.2 rows; squashed from the square crop it would be 10/100: 1.6) and its centre mid-height.
    for view, thickness in ((decoded, 3.2), (square_crop_before(content, (16, 32), 3), 1.6)):
        profile = (view[:, 16:, 0].astype(float) - view[:, 16:, 1]).mean(axis=1) / 255
        assert abs(profile.sum() - thickness) < 0.2, profile
        assert abs((profile * np.arange(16)).sum() / profile.sum() - 7.5) < 0.25
    green_columns = np.flatnonzero(is_colour(decoded, GREEN).all(axis=0))
    assert green_columns.tolist() == [0, 1, 2]  # 10/100 of 32 columns = 3.2


def test_a_tall_model_keeps_the_middle_of_a_wide_upload():
    """A 1:2 model (32 x 16) and a 200 x 100 (W x H) upload: the box is columns 75-124, every row. A blue
    block in columns 0-49 is outside it; a red bar in columns 95-104 lands mid-width."""
    image = canvas(100, 200)
    image[:, 0:50] = BLUE
    image[:, 95:105] = RED
    decoded = decode_image(png_bytes(image), (32, 16))
    assert decoded.shape == (32, 16, 3)
    expected = Image.fromarray(image).crop((75, 0, 125, 100)).resize((16, 32), Image.BILINEAR)
    assert np.array_equal(decoded, np.asarray(expected))
    assert not is_colour(decoded, BLUE).any()
    red_columns = np.flatnonzero(is_colour(decoded, RED).all(axis=0))
    assert red_columns.tolist() == [7, 8]  # (95-75)/50*16 = 6.4 to (105-75)/50*16 = 9.6, blended edges
    assert is_colour(decoded[:, [0, 1, 14, 15]], GRAY).all()


WIDE = (16, 32)  # H x W of the non-square model


@pytest.fixture(scope="module")
def wide_repository(imagefolder, tmp_path_factory):
    """A tiny mwresnet8_3 with a 16 x 32 (H x W) input, BatchNorm statistics from the image folder resized
    to that size, exported to ONNX."""
    import torch

    from training.checkpoint import build_metadata, save_checkpoint
    from training.datasets import channel_stats, load_split
    from training.models import create_model
    from training.transforms import to_normalized

    torch.manual_seed(3)
    train = load_split(imagefolder, "train", image_size=WIDE, cache_dir=None)
    network = create_model("mwresnet8_3", num_classes=len(train.classes), width=4, input_size=(3, *WIDE))
    mean, std = channel_stats(train.images)
    network.train()
    with torch.no_grad():
        network(to_normalized(train.images, mean, std))
    network.eval()
    meta = build_metadata(network, classes=train.classes, mean=mean, std=std,
                          heldout={"seed": 0, "size": 30, "source": str(imagefolder), "num_train": len(train)},
                          training={"model_kwargs": {"width": 4}}, heldout_acc=[0.4, 0.5, 0.6])
    folder = tmp_path_factory.mktemp("wide")
    save_checkpoint(folder / "wide.safetensors", network, meta)
    export_tiny(folder / "wide.safetensors", folder / "model_repository")
    return folder / "model_repository"


def final_probabilities(repository, images: np.ndarray) -> np.ndarray:
    """Softmax of the final exit's ONNX model on uint8 NHWC `images`, normalised with the manifest's stats."""
    manifest = read_manifest(repository)
    entry = manifest.exits[-1].exit_model
    normalised = ((images.astype(np.float32) / 255 - np.array(manifest.mean, np.float32))
                  / np.array(manifest.std, np.float32)).transpose(0, 3, 1, 2).astype(np.float32)
    logits = create_session(str(repository / entry.name / str(entry.version) / "model.onnx")).run(
        None, {"images": normalised})[0].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_a_non_square_model_classifies_the_centred_box_of_its_aspect_ratio(wide_repository, tmp_path):
    """/v1/classify on a real 16 x 32 model: the answer is the model's on the upload's centred 2:1 box
    resized, not on its square crop squashed."""
    assert read_manifest(wide_repository).input.shape == [3, *WIDE]
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    image[20:30] = RED
    content = png_bytes(image)
    box = np.asarray(Image.fromarray(image).crop((0, 24, 96, 72)).resize((32, 16), Image.BILINEAR))[None]
    squashed = square_crop_before(content, WIDE, 3)[None]
    expected, before = final_probabilities(wide_repository, box)[0], final_probabilities(wide_repository, squashed)[0]
    assert np.abs(expected - before).max() > 1e-3  # the two views really answer differently
    classes = read_manifest(wide_repository).classes
    with GatewayProcess(wide_repository, log_path=tmp_path / "gateway.log") as gateway:
        answer = httpx.post(f"http://{gateway.http_url}/v1/classify", params={"policy": "full", "top_k": 3},
                            files={"files": ("bar.png", content)}, timeout=30)
        assert answer.status_code == 200, answer.text
        [result] = answer.json()["results"]
        served = {entry["label"]: entry["probability"] for entry in result["top_k"]}
        np.testing.assert_allclose([served[name] for name in classes], expected, atol=1e-4)
        assert gateway.stop() == 0
