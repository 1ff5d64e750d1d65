"""DelugeNets: the cross-layer depthwise inflow against a naive implementation, the stage
wiring, the registry entries, and a tiny DelugeNet through export and the gateway."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.http as httpclient

from common.manifest import read_manifest
from common.onnxruntime_session import create_session
from training.delugenet import CrossLayerDepthwise, DelugeStage, boundary_floats
from training.models import create_model

from .conftest import GatewayProcess, export_tiny, save_tiny_checkpoint


def _naive_inflow(module: CrossLayerDepthwise, stack: torch.Tensor) -> torch.Tensor:
    """Channel c of the output = sum over layers l of conv(BN(stack)[layer l, channel c], kernel[c, l])."""
    x = module.bn(stack)
    channels, layers = module.channels, module.layers
    weight = module.conv.weight  # [C, L, k, k]: group c holds one kernel per layer
    out = []
    for c in range(channels):
        total = 0
        for layer in range(layers):
            plane = x[:, layer * channels + c: layer * channels + c + 1]
            total = total + F.conv2d(plane, weight[c:c + 1, layer:layer + 1], stride=module.conv.stride,
                                     padding=module.conv.padding)
        out.append(total)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(("layers", "kernel", "stride"), [(1, 1, 1), (3, 1, 1), (4, 3, 2)])
def test_cross_layer_depthwise_matches_a_naive_implementation(layers, kernel, stride):
    torch.manual_seed(0)
    module = CrossLayerDepthwise(channels=5, layers=layers, kernel_size=kernel, stride=stride).eval()
    torch.nn.init.normal_(module.conv.weight)
    module.bn.running_mean.normal_()
    module.bn.running_var.uniform_(0.5, 2)
    stack = torch.randn(2, 5 * layers, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(stack), _naive_inflow(module, stack))
    assert module(stack).shape == (2, 5, 8 // stride, 8 // stride)


def test_each_block_reads_every_earlier_block_of_its_stage():
    torch.manual_seed(0)
    stage = DelugeStage(in_channels=4, in_layers=2, out_channels=6, inner=3, blocks=3, stride=2).eval()
    stack = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = stage(stack)
        first = stage.blocks[0](stack)
        second = stage.blocks[1](first)
        third = stage.blocks[2](torch.cat([first, second], dim=1))
    assert out.shape == (2, 18, 4, 4)
    torch.testing.assert_close(out, torch.cat([first, second, third], dim=1))
    # Block 2 depends on block 0's output directly (cross-layer), not only through block 1.
    assert stage.blocks[2].inflow.layers == 2


@pytest.mark.parametrize(("name", "depths", "params_m"), [
    ("mwdelugenet29_3", [10, 19, 29], 0.28),
    ("mwdelugenet146_3", [49, 97, 146], 6.25),
    ("mwdelugenet218_3", [73, 145, 218], 9.65),
    ("mwwidedelugenet146_3", [49, 97, 146], 18.26),
])
def test_registry_entries_count_params_and_macs(name, depths, params_m):
    model = create_model(name)
    assert model.exit_depths == depths
    assert model.exits[-1].params / 1e6 == pytest.approx(params_m, abs=0.01)
    macs = [spec.macs for spec in model.exits]
    assert all(0 < a < b for a, b in zip(macs, macs[1:]))
    # The boundary carries every block of the stage: blocks x channels x map.
    blocks = (depths[-1] - 2) // 9
    width = model.segments[0].blocks[0].body.body[-1].out_channels
    assert boundary_floats(model) == [blocks * width * 32 * 32, blocks * 2 * width * 16 * 16, 0]


def test_small_delugenet_costs_about_what_resnet20_costs():
    deluge, resnet = create_model("mwdelugenet29_3"), create_model("mwresnet20_3")
    assert deluge.exits[-1].macs / resnet.exits[-1].macs == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def tiny_deluge_repository(imagefolder, tmp_path_factory):
    root = tmp_path_factory.mktemp("deluge")
    checkpoint = save_tiny_checkpoint(imagefolder, root / "deluge.safetensors", "mwdelugenet29_3", width=8)
    export_tiny(checkpoint, root / "model_repository")
    return root / "model_repository"


def test_tiny_delugenet_exports_per_exit_and_per_segment_and_serves(tiny_deluge_repository):
    manifest = read_manifest(tiny_deluge_repository)
    assert manifest.model == "mwdelugenet29_3" and manifest.exit_depths == [10, 19, 29]
    # The first segment hands on the stack of its 3 blocks' 8-channel maps.
    first_segment = manifest.exits[0].segment_model
    features = [spec for spec in first_segment.outputs if spec.name != "logits"][0]
    assert features.shape == [3 * 8, 32, 32]
    images = np.random.default_rng(3).standard_normal((4, *manifest.input.shape)).astype(np.float32)
    final = manifest.exits[-1].exit_model
    session = create_session(str(tiny_deluge_repository / final.name / str(final.version) / "model.onnx"))
    expected = session.run(None, {"images": images})[0]
    with GatewayProcess(tiny_deluge_repository) as gateway:
        client = httpclient.InferenceServerClient(gateway.http_url)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        full = client.infer("mwdelugenet29_3", [tensor], parameters={"policy": "full"})
        first = client.infer("mwdelugenet29_3", [tensor], parameters={"policy": "fixed", "exit_depth": 10})
    # The gateway's full policy runs the cascade segment by segment: same logits as the per-exit model.
    np.testing.assert_allclose(full.as_numpy("logits"), expected, atol=1e-4)
    assert full.as_numpy("exit_depth").tolist() == [29] * 4
    assert first.as_numpy("exit_depth").tolist() == [10] * 4
