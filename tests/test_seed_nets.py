"""The seed papers' networks: AuxResNet variants and the wide ResNet, built, counted,
run exit by exit and exported to ONNX (validated against PyTorch per exit and per segment)."""

from __future__ import annotations

import pytest
import torch

from export.onnx_export import export_and_validate
from training.models import create_model, list_models
from training.seed_nets import WidePreActBlock

# name -> (exit depths, exit blocks)
AUX = {
    "mwresnet56_2": ([45, 56], [22, 27]),
    "mwresnet56_3": ([35, 45, 56], [17, 22, 27]),
    "mwresnet44_2": ([39, 44], [19, 21]),
    "mwwrn26_2_10": ([19, 26], [9, 12]),
}


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=10).eval() for name in AUX}


@pytest.mark.parametrize("name", sorted(AUX))
def test_entry_has_the_papers_exits_and_counts_params_and_macs(name, built):
    assert name in list_models()
    model = built[name]
    depths, blocks = AUX[name]
    assert model.exit_depths == depths
    assert [spec.block for spec in model.exits] == blocks
    params = [spec.params for spec in model.exits]
    macs = [spec.macs for spec in model.exits]
    assert all(a < b for a, b in zip(params, params[1:]))
    assert all(a < b for a, b in zip(macs, macs[1:]))
    # The final exit's params are the whole network's (no early head is on its path).
    early_heads = sum(p.numel() for head in model.heads[:-1] for p in head.parameters())
    assert params[-1] == sum(p.numel() for p in model.parameters()) - early_heads
    for spec in model.exits:
        assert spec.standalone_macs <= spec.macs


def test_resnet56_variants_share_the_mwresnet56_5_trunk_costs(built):
    reference = {spec.depth: spec for spec in create_model("mwresnet56_5").exits}
    for name in ("mwresnet56_2", "mwresnet56_3"):
        for spec in built[name].exits:
            assert spec.standalone_macs == reference[spec.depth].standalone_macs
            assert spec.params == reference[spec.depth].params


def test_wide_resnet_26_10_layout_and_costs(built):
    model = built["mwwrn26_2_10"]
    blocks = [block for segment in model.segments for block in segment]
    assert len(blocks) == 12 and all(isinstance(block, WidePreActBlock) for block in blocks)
    widths = [block.conv2.out_channels for block in blocks]
    assert widths == [160] * 4 + [320] * 4 + [640] * 4
    # The early exit (depth 19, after block 9) sits inside the third stage, after its first block.
    assert len(model.segments[0]) == 9 and blocks[8].conv1.stride == (2, 2)
    assert model.heads[0].fc.in_features == 640
    final = model.exits[-1]
    assert 35e6 < final.params < 37e6  # WRN-26-10: about 36.5 M parameters
    assert 5.0e9 < final.macs < 5.5e9  # about 5.2 GMAC on a 32x32 image
    assert 3.5e9 < model.exits[0].macs < 4.0e9


def test_wide_resnet_dropout_option():
    model = create_model("mwwrn26_2_10", num_classes=10, width=2, dropout=0.3)
    block = model.segments[0][0]
    assert isinstance(block.dropout, torch.nn.Dropout) and block.dropout.p == 0.3
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    torch.testing.assert_close(a, b)  # eval: dropout off, deterministic
    model.train()
    with torch.no_grad():
        c, d = model(x)[-1], model(x)[-1]
    assert not torch.allclose(c, d)  # training: dropout draws differ


@pytest.mark.parametrize("name", sorted(AUX))
def test_forward_until_every_exit_matches_forward(name, built):
    model = built[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        assert len(full) == len(AUX[name][0])
        for index in range(len(model.exits)):
            logits, activations = model.forward_until(index, x)
            assert logits.shape == (2, 10)
            torch.testing.assert_close(logits, full[index])
            if index + 1 < len(model.exits):
                next_logits, _ = model.run_segment(index + 1, activations)
                torch.testing.assert_close(next_logits, full[index + 1])


@pytest.mark.parametrize("name", sorted(AUX))
def test_exports_per_exit_and_per_segment_match_pytorch(name, built):
    model = built[name]
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32).numpy()
    with torch.no_grad():
        scale = max(float(logits.abs().max()) for logits in model(torch.from_numpy(images)))
    exits = list(range(len(model.exits)))
    exported = export_and_validate(model, images, exits, tolerance=1e-4 * max(1.0, scale), min_agreement=1.0)
    assert {(m.kind, m.exit_index) for m in exported} == {(kind, i) for kind in ("exit", "segment") for i in exits}
    assert all(m.top1_agreement == 1.0 for m in exported)
