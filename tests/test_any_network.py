"""Bring your own network and data (issue 24): input shape and channels from the data, exits on any
backbone (`training.attach.attach_exits`), `--pretrained` and `--freeze-backbone`, and a 224x224
round trip through train -> export -> gateway. Tiny data, one short epoch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from safetensors.torch import load_file

from common.errors import UserError
from common.manifest import read_manifest
from common.onnxruntime_session import create_session
from export.onnx_export import export_and_validate
from export.pipeline import ExportOptions, export_checkpoint
from training.attach import BACKBONE_ENTRIES, attach_exits, import_torchvision
from training.checkpoint import load_checkpoint, load_metadata
from training.models import create_model

from .conftest import GatewayProcess, png_bytes, run_module

CLASSES = ("a", "b", "c")
FAST = ["--no-progress", "--threads", "1", "--epochs", "1", "--schedule", "constant", "--lr", "0.01"]


def make_folder(root: Path, size: tuple[int, int], mode: str, train: int, test: int, seed: int = 0) -> Path:
    """`root/{train,test}/<class>/*.png`: a class-dependent bright square on noise, in Pillow `mode`."""
    rng = np.random.default_rng(seed)
    height, width = size
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
                top = label * height // 4
                image[top:top + height // 4, width // 4:width // 2] = 230
                Image.fromarray(image).convert(mode).save(folder / f"{i}.png")
    return root


def normalise(raw: np.ndarray, manifest) -> np.ndarray:
    mean, std = np.array(manifest.mean, np.float32), np.array(manifest.std, np.float32)
    return ((raw.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)


def full_network_logits(repository: Path, images: np.ndarray) -> np.ndarray:
    entry = read_manifest(repository).exits[-1].exit_model
    session = create_session(str(repository / entry.name / str(entry.version) / "model.onnx"))
    return session.run(None, {"images": images})[0]


def infer_raw(client_module, url: str, model: str, raw: np.ndarray):
    client = client_module.InferenceServerClient(url)
    tensor = client_module.InferInput("images", list(raw.shape), "UINT8")
    tensor.set_data_from_numpy(raw)
    return client.infer(model, [tensor], parameters={"policy": "full"})


# ----------------------------------------------------------------------------
# Input shape and channels from the data


def test_a_grayscale_28x28_folder_stays_one_channel_28x28_from_training_to_the_gateway(tmp_path):
    data = make_folder(tmp_path / "gray28", (28, 28), "L", train=8, test=2)
    checkpoint = tmp_path / "gray.safetensors"
    result = run_module("training.train", "--model", "mwresnet8_3", "--width", "4", "--data", str(data),
                        "--heldout-size", "6", "--batch-size", "9", "--output", str(checkpoint), *FAST)
    assert result.returncode == 0, result.stderr
    assert "(1x28x28, C x H x W)" in result.stdout
    meta = load_metadata(checkpoint)
    assert meta.input_size == [1, 28, 28] and len(meta.normalization.mean) == 1
    model, _ = load_checkpoint(checkpoint)
    assert model.stem.in_channels == 1 and model.input_size == (1, 28, 28)

    repository = tmp_path / "repo"
    export_checkpoint(ExportOptions(checkpoint=checkpoint, output=repository, validation_images=6),
                      log=lambda message: None)
    manifest = read_manifest(repository)
    assert manifest.input.shape == [1, 28, 28]
    assert manifest.exits[-1].segment_model.inputs[0].shape == [8, 14, 14]  # activations, not the image

    raw = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    expected = full_network_logits(repository, normalise(raw, manifest))
    with GatewayProcess(repository, log_path=tmp_path / "gateway.log") as gateway:
        for module, url in ((grpcclient, gateway.grpc_url), (httpclient, gateway.http_url)):
            answer = infer_raw(module, url, "mwresnet8_3", raw)
            np.testing.assert_allclose(answer.as_numpy("logits"), expected, atol=1e-3)
        wrong = np.zeros((1, 32, 32, 3), np.uint8)  # the CIFAR shape is not this model's
        with pytest.raises(Exception, match=r"UINT8 \[N, 28, 28, 1\]"):
            infer_raw(grpcclient, gateway.grpc_url, "mwresnet8_3", wrong)
        metadata = httpclient.InferenceServerClient(gateway.http_url).get_model_metadata("mwresnet8_3")
        assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]

        # Uploads: a grayscale PNG of the model's size answers as its raw tensor does; an RGB photo of
        # another size is converted to one channel (Pillow's "L") and resized.
        gray_png = png_bytes(raw[0, :, :, 0])
        colour = np.random.default_rng(2).integers(0, 256, size=(60, 45, 3), dtype=np.uint8)
        files = [("files", ("gray.png", gray_png, "image/png")),
                 ("files", ("colour.png", png_bytes(colour), "image/png"))]
        response = httpx.post(f"http://{gateway.http_url}/v1/classify", files=files,
                              params={"policy": "full", "top_k": 3}, timeout=30)
        assert response.status_code == 200, response.text
        gray, rgb = response.json()["results"]
        probabilities = np.exp(expected[0] - expected[0].max())
        probabilities /= probabilities.sum()
        assert gray["class_index"] == int(expected[0].argmax())
        assert gray["probability"] == pytest.approx(float(probabilities.max()), abs=1e-4)
        assert rgb["label"] in CLASSES and len(rgb["top_k"]) == 3


def test_old_checkpoint_metadata_without_an_input_size_reads_as_3x32x32(tiny_checkpoint, tmp_path):
    import json

    from common.checkpoint_meta import CheckpointMeta

    data = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    del data["input_size"]
    assert CheckpointMeta.from_dict(data).input_size == [3, 32, 32]


# ----------------------------------------------------------------------------
# Exits on any backbone


@pytest.fixture(scope="module")
def resnet18_with_exits():
    torchvision = import_torchvision()
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(weights=None)
    return attach_exits(backbone, after=["layer1", "layer2", "layer3"], num_classes=5, input_size=(3, 64, 64))


def test_attach_exits_on_torchvision_resnet18(resnet18_with_exits):
    model = resnet18_with_exits.eval()
    assert len(model.exits) == 4  # three attached exits and the backbone's own classifier
    assert [e.depth for e in model.exits] == [5, 9, 13, 18]
    assert all(later.macs > earlier.macs and later.params > earlier.params
               for earlier, later in zip(model.exits, model.exits[1:]))
    assert model.exits[-1].standalone_macs < model.exits[-1].macs  # the early heads cost something
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        full = model(images)
        assert [tuple(logits.shape) for logits in full] == [(4, 5)] * 4
        for index in range(4):
            logits, _ = model.forward_until(index, images)
            torch.testing.assert_close(logits, full[index])


def test_attached_resnet18_exports_per_exit_and_per_segment(resnet18_with_exits):
    model = resnet18_with_exits.eval()
    images = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    exported = export_and_validate(model, images, [0, 1, 2, 3])  # raises on any mismatch with PyTorch
    assert sorted((item.kind, item.exit_index) for item in exported) == [
        *(("exit", i) for i in range(4)), *(("segment", i) for i in range(4))]
    assert all(item.max_abs_error <= 1e-4 and item.top1_agreement == 1.0 for item in exported)
    segments = [item for item in exported if item.kind == "segment"]
    assert [s.inputs[0].shape for s in segments] == [[3, 64, 64], [64, 16, 16], [128, 8, 8], [256, 4, 4]]


def test_the_cut_is_checked_against_the_backbone_forward():
    class Skip(torch.nn.Module):  # its forward is not the sequence of its children
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv1(x)
            return y + self.conv2(y)

    with pytest.raises(UserError, match="not the sequence of its children"):
        attach_exits(Skip(), after=["conv1"], num_classes=2, input_size=(3, 8, 8), final_head="linear")
    with pytest.raises(UserError, match="no module named 'layer9'"):
        attach_exits(import_torchvision().models.resnet18(), after=["layer9"], num_classes=2, input_size=(3, 32, 32))


@pytest.mark.parametrize("name", sorted(BACKBONE_ENTRIES))
def test_registry_backbones_build_without_downloads(name):
    model = create_model(name, num_classes=4, input_size=(1, 32, 32)).eval()
    exits = len(BACKBONE_ENTRIES[name][1]) + 1  # the attached exits and the backbone's own classifier
    assert model.input_size == (1, 32, 32) and len(model.exits) == exits
    assert all(a.macs < b.macs and a.params < b.params and a.depth < b.depth
               for a, b in zip(model.exits, model.exits[1:]))
    with torch.no_grad():
        assert [tuple(out.shape) for out in model(torch.zeros(2, 1, 32, 32))] == [(2, 4)] * exits


def test_pretrained_weights_load_and_freeze_backbone_trains_only_the_heads(imagefolder, tmp_path):
    torchvision = import_torchvision()
    torch.manual_seed(1)
    original = torchvision.models.mobilenet_v3_small(weights=None)
    weights = tmp_path / "mobilenet.pth"
    torch.save(original.state_dict(), weights)
    model = create_model("tv_mobilenet_v3_small", num_classes=3, input_size=(3, 32, 32), pretrained=weights)
    torch.testing.assert_close(model.segments[1][0].state_dict()["block.0.0.weight"],
                               original.features[4].state_dict()["block.0.0.weight"])

    checkpoint = tmp_path / "frozen.safetensors"
    result = run_module("training.train", "--model", "tv_mobilenet_v3_small", "--data", str(imagefolder),
                        "--pretrained", str(weights), "--freeze-backbone", "--heldout-size", "30",
                        "--batch-size", "30", "--limit-train", "30", "--output", str(checkpoint), *FAST)
    assert result.returncode == 0, result.stderr
    trained = load_file(str(checkpoint))
    before = original.state_dict()
    # The trunk (batch-norm statistics included) is the pre-trained backbone's, bit for bit.
    assert torch.equal(trained["segments.0.features_0.0.weight"], before["features.0.0.weight"])
    assert torch.equal(trained["segments.1.features_4.block.0.1.running_mean"],
                       before["features.4.block.0.1.running_mean"])
    # The final exit is the backbone's classifier: its hidden layer trained from the pre-trained weights.
    assert not torch.equal(trained["heads.2.body.classifier.0.weight"], before["classifier.0.weight"])
    meta = load_metadata(checkpoint)
    assert meta.training["freeze_backbone"] and meta.training["pretrained"] == str(weights)
    assert "pretrained" not in meta.model_kwargs  # rebuilding needs only the checkpoint
    rebuilt, _ = load_checkpoint(checkpoint)
    assert rebuilt.name == "tv_mobilenet_v3_small"


# ----------------------------------------------------------------------------
# ImageNet-size inputs through the whole chain


def test_224x224_round_trip_train_export_serve_and_load(tmp_path):
    from benchmarks.loadgen import Target, closed_loop

    data = make_folder(tmp_path / "rgb224", (224, 224), "RGB", train=4, test=1)
    checkpoint = tmp_path / "mbv3.safetensors"
    result = run_module("training.train", "--model", "tv_mobilenet_v3_small", "--data", str(data),
                        "--heldout-size", "3", "--batch-size", "9", "--output", str(checkpoint), *FAST)
    assert result.returncode == 0, result.stderr
    meta = load_metadata(checkpoint)
    assert meta.input_size == [3, 224, 224]
    assert [e.macs for e in meta.exits] == sorted(e.macs for e in meta.exits) and meta.exits[-1].macs > 5e7

    repository = tmp_path / "repo"
    export_checkpoint(ExportOptions(checkpoint=checkpoint, output=repository, validation_images=3),
                      log=lambda message: None)
    manifest = read_manifest(repository)
    assert manifest.input.shape == [3, 224, 224] and manifest.model == "tv_mobilenet_v3_small"

    raw = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    expected = full_network_logits(repository, normalise(raw, manifest))
    with GatewayProcess(repository, log_path=tmp_path / "gateway.log") as gateway:
        answer = infer_raw(grpcclient, gateway.grpc_url, manifest.model, raw)
        np.testing.assert_allclose(answer.as_numpy("logits"), expected, atol=1e-3)
        photo = np.random.default_rng(4).integers(0, 256, size=(300, 260, 3), dtype=np.uint8)
        response = httpx.post(f"http://{gateway.http_url}/v1/classify",
                              files=[("files", ("photo.png", png_bytes(photo), "image/png"))], timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["exit_depth"] in manifest.exit_depths
        # A few seconds of load through the cascade (early exit at a 0.5 threshold).
        target = Target("grpc", gateway.grpc_url, manifest.model, parameters={"threshold": 0.5})
        level = asyncio.run(closed_loop(target, normalise(raw, manifest), np.zeros(2, np.int64), concurrency=2,
                                        max_requests=40, max_seconds=3))
        assert level.completed > 0 and level.errors == 0 and sum(level.exits.values()) == level.completed


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "mwresnet8_3", "--pretrained", "weights.pth"], "mwresnet8_3 has none: use --init-from"),
    (["--model", "tv_resnet18", "--freeze-backbone", "--freeze-trunk", "--init-from", "x.safetensors"],
     "alternatives"),
    (["--model", "tv_resnet18", "--channels", "2"], "invalid choice"),
])
def test_bad_backbone_options_are_one_line_errors(imagefolder, extra, message):
    result = run_module("training.train", "--data", str(imagefolder), *extra)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
