"""The seed papers' networks: AuxResNet variants and the wide ResNet, built, counted,
run exit by exit and exported to ONNX (validated against PyTorch per exit and per segment)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from export.onnx_export import export_and_validate
from training.cheap_conv import OFFSETS, cheap_conv, parse_conv, shift, shift_groups
from training.checkpoint import build_metadata, load_checkpoint, load_metadata, save_checkpoint
from training.losses import MultiExitLoss, online_distillation_loss
from training.models import count_macs, create_model, list_models
from training.online_distill import (
    DEFAULT_STUDENT_WEIGHT,
    DEFAULT_TEACHER_WEIGHT,
    DEFAULT_TEMPERATURE,
    OnlineDistillLoss,
    OnlineTeacherGroup,
    final_classifier,
)
from training.seed_nets import WidePreActBlock
from training.train import TrainConfig

from .conftest import export_tiny, run_module, save_tiny_checkpoint

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


# ----------------------------------------------------------------------------
# Cheap convolutions


def _reference_group_conv(x, weight, stride, groups):
    """Group convolution as G standard convolutions on channel slices, concatenated."""
    in_per, out_per = x.shape[1] // groups, weight.shape[0] // groups
    return torch.cat([F.conv2d(x[:, g * in_per:(g + 1) * in_per], weight[g * out_per:(g + 1) * out_per],
                               stride=stride, padding=1) for g in range(groups)], dim=1)


def _reference_depthwise_separable(x, depthwise, pointwise, stride):
    """One single-channel convolution per channel, then the 1x1 convolution as a channel matmul."""
    per_channel = torch.cat([F.conv2d(x[:, c:c + 1], depthwise[c:c + 1], stride=stride, padding=1)
                             for c in range(x.shape[1])], dim=1)
    return torch.einsum("oc,nchw->nohw", pointwise[:, :, 0, 0], per_channel)


def _reference_shift(x, pointwise, stride):
    """The shift as a fixed depth-wise convolution with one-hot 3x3 kernels, then the 1x1 convolution."""
    channels = x.shape[1]
    kernel = torch.zeros(channels, 1, 3, 3)
    for (start, end), (dy, dx) in zip(shift_groups(channels), OFFSETS):
        kernel[start:end, 0, 1 + dy, 1 + dx] = 1.0
    shifted = F.conv2d(x, kernel, padding=1, groups=channels)
    return F.conv2d(shifted, pointwise, stride=stride)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("in_channels,out_channels", [(16, 32), (10, 12)])
def test_cheap_convolutions_match_reference_implementations(stride, in_channels, out_channels):
    torch.manual_seed(0)
    x = torch.randn(3, in_channels, 9, 9)
    standard = torch.nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    group = cheap_conv(standard, "group", 2)
    assert group.groups == 2 and group.weight.shape == (out_channels, in_channels // 2, 3, 3)
    depthwise = cheap_conv(standard, "depthwise", 1)
    shifted = cheap_conv(standard, "shift", 1)
    with torch.no_grad():
        torch.testing.assert_close(group(x), _reference_group_conv(x, group.weight, stride, 2))
        torch.testing.assert_close(depthwise(x), _reference_depthwise_separable(
            x, depthwise.depthwise.weight, depthwise.pointwise.weight, stride))
        torch.testing.assert_close(shifted(x), _reference_shift(x, shifted.pointwise.weight, stride))
    # Honest counts: a shift costs nothing, only its 1x1 convolution does.
    size = (9 + 2 - 3) // stride + 1
    assert count_macs(shifted, x[:1]) == size * size * in_channels * out_channels
    assert count_macs(group, x[:1]) == count_macs(standard, x[:1]) // 2
    assert count_macs(depthwise, x[:1]) == size * size * (9 * in_channels + in_channels * out_channels)
    assert sum(p.numel() for p in shifted.parameters()) == in_channels * out_channels


def test_shift_moves_each_channel_group_by_its_offset():
    x = torch.arange(9 * 5 * 5, dtype=torch.float32).reshape(1, 9, 5, 5)
    out = shift(x)
    for channel, (dy, dx) in enumerate(OFFSETS):  # nine channels: one a group
        assert out[0, channel, 2, 2] == x[0, channel, 2 + dy, 2 + dx]
    assert out[0, 0, 0, 0] == 0 and out[0, 8, 4, 4] == 0  # zeros shifted in at the border
    assert shift_groups(16) == [(0, 1), (1, 3), (3, 5), (5, 7), (7, 8), (8, 10), (10, 12), (12, 14), (14, 16)]


@pytest.mark.parametrize("text", ["group:1", "group:x", "dense", "depthwise:2"])
def test_unknown_cheap_convolution_is_a_user_error(text):
    with pytest.raises(UserError, match="known: standard, group:G, depthwise, shift"):
        parse_conv(text)
    with pytest.raises(UserError, match="does not divide"):
        create_model("mwresnet8_3", conv="group:3")


def _conv3x3(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("name,kwargs", [("mwresnet8_3", {}), ("mwwrn26_2_10", {"width": 4})])
@pytest.mark.parametrize("conv", ["group:4", "depthwise", "shift"])
def test_cheap_student_of_a_registry_network_counts_honestly_and_exports(name, kwargs, conv):
    torch.manual_seed(0)
    reference = create_model(name, num_classes=5, **kwargs).eval()
    student = create_model(name, num_classes=5, conv=conv, **kwargs).eval()
    # Only the stem's 3x3 convolution stays dense; the rest are grouped, depth-wise or gone.
    dense = [m for m in _conv3x3(student) if m.groups == 1]
    assert dense == [student.stem]
    if conv == "shift":
        assert _conv3x3(student) == [student.stem]
    for ref, cheap in zip(reference.exits, student.exits):
        assert cheap.params < ref.params and cheap.macs < ref.macs
    # MACs are what the convolutions and linear layers left cost: the sum over the modules.
    expected = _module_macs(student)
    assert abs(student.exits[-1].standalone_macs - expected) <= 0.001 * expected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = student(x)
        for index in range(len(student.exits)):
            torch.testing.assert_close(student.forward_until(index, x)[0], full[index])
    images = x.numpy()
    scale = max(1.0, max(float(logits.abs().max()) for logits in full))
    exits = list(range(len(student.exits)))
    exported = export_and_validate(student, images, exits, tolerance=1e-4 * scale, min_agreement=1.0)
    assert len(exported) == 2 * len(exits)
    if conv == "shift":  # exported as data movement: Pad, Slice and Concat, and 1x1 convolutions
        graph = onnx.load_from_string(exported[0].onnx_bytes).graph
        op_types = {node.op_type for node in graph.node}
        assert {"Pad", "Slice", "Concat"} <= op_types
        kernels = [list(attr.ints) for node in graph.node if node.op_type == "Conv"
                   for attr in node.attribute if attr.name == "kernel_shape"]
        assert kernels.count([3, 3]) == 1  # the stem


def _module_macs(model):
    """MACs of the final exit's path (no early heads) from layer shapes, hooked on every conv and FC."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    from training.models import _trunk_until

    with torch.no_grad():
        last = len(model.exits) - 1
        model.heads[last](_trunk_until(model, last, torch.zeros(1, 3, 32, 32)))
    for handle in handles:
        handle.remove()
    return total


def test_cheap_student_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("mwresnet8_3", num_classes=3, conv="shift")
    meta = build_metadata(model, classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3,
                          heldout={"seed": 0, "size": 0, "source": "none", "num_train": 0},
                          training={"model_kwargs": {"width": 16, "conv": "shift"}},
                          epochs_completed=0, epochs_planned=0, heldout_acc=[0.0] * 3)
    save_checkpoint(tmp_path / "student.safetensors", model, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "student.safetensors")
    assert loaded_meta.model_kwargs["conv"] == "shift"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[-1], model.eval()(x)[-1])
    assert [e.macs for e in loaded.exits] == [e.macs for e in model.exits]


# ----------------------------------------------------------------------------
# Online distillation


def test_online_distillation_loss_reaches_every_student_and_the_teacher_head():
    torch.manual_seed(0)
    students = [create_model("mwresnet8_3", num_classes=4, width=4, conv="depthwise") for _ in range(3)]
    group = OnlineTeacherGroup(students).train()
    assert group.teacher_head.in_features == 3 * final_classifier(students[0]).in_features
    x, targets = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    outputs = group(x)
    assert len(outputs.students) == 3 and outputs.teacher.shape == (6, 4)
    assert list(outputs) == outputs.students[0]  # reads as the first student's exits
    loss = OnlineDistillLoss(MultiExitLoss((1.0, 1.0, 1.0)))
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value)
    assert group.teacher_head.weight.grad.abs().sum() > 0
    for student in students:
        for module in (student.stem, student.segments[0][0].conv1.depthwise, student.heads[0].fc,
                       student.heads[-1].fc):
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_online_distillation_terms_and_their_gradient_directions():
    torch.manual_seed(0)
    targets = torch.tensor([0, 1, 2])
    student = [torch.randn(3, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)]
    teacher = torch.randn(3, 3, requires_grad=True)
    plain = MultiExitLoss((1.0, 1.0))
    t = 3.0
    # No KL weights: the sum of the cross-entropies.
    base = online_distillation_loss([student], teacher, targets, plain, t, 0.0, 0.0)
    torch.testing.assert_close(base, plain(student, targets) + F.cross_entropy(teacher, targets))
    # The student term moves the student's final exit only; the teacher term the teacher only.
    to_student = (online_distillation_loss([student], teacher, targets, plain, t, 1.0, 0.0)
                  - online_distillation_loss([student], teacher, targets, plain, t, 0.0, 0.0))
    expected = t * t * F.kl_div(F.log_softmax(student[1] / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
    torch.testing.assert_close(to_student, expected)
    grads = torch.autograd.grad(to_student, [student[0], student[1], teacher], allow_unused=True)
    assert _no_gradient(grads[0]) and grads[1].abs().sum() > 0 and _no_gradient(grads[2])
    to_teacher = (online_distillation_loss([student], teacher, targets, plain, t, 0.0, 1.0)
                  - online_distillation_loss([student], teacher, targets, plain, t, 0.0, 0.0))
    grads = torch.autograd.grad(to_teacher, [student[1], teacher], allow_unused=True)
    assert _no_gradient(grads[0]) and grads[1].abs().sum() > 0


def _no_gradient(grad):
    return grad is None or not grad.abs().sum() > 0


def test_online_distill_defaults_agree_with_the_training_flags():
    config = TrainConfig()
    assert (config.od_temperature, config.od_student_weight, config.od_teacher_weight) == (
        DEFAULT_TEMPERATURE, DEFAULT_STUDENT_WEIGHT, DEFAULT_TEACHER_WEIGHT)


def test_online_distill_training_keeps_one_cheap_student_and_records_the_method(imagefolder, tmp_path):
    checkpoint = tmp_path / "od.safetensors"
    result = run_module("training.train", "--model", "mwresnet8_3", "--width", "4", "--heldout-size", "30",
                        "--batch-size", "45", "--no-progress", "--threads", "1", "--epochs", "1",
                        "--conv", "shift", "--online-distill", "2", "--data", str(imagefolder),
                        "--output", str(checkpoint))
    assert result.returncode == 0, result.stderr
    meta = load_metadata(checkpoint)
    assert meta.model_kwargs["conv"] == "shift"
    recorded = meta.training["online_distill"]
    assert recorded["students"] == 2 and recorded["kept_student"] in (0, 1)
    assert (recorded["temperature"], recorded["student_weight"], recorded["teacher_weight"]) == (3.0, 1.0, 1.0)
    assert len(recorded["students_heldout_acc"]) == 2 and 0 <= recorded["teacher_heldout_acc"] <= 1
    model, _ = load_checkpoint(checkpoint)  # one student: an ordinary multi-exit network
    assert model.exit_depths == [3, 5, 8]
    assert not any(key.startswith("students.") or "teacher" in key for key in model.state_dict())
    # The resume state holds the whole group: every student and the teacher head.
    state = torch.load(checkpoint.with_suffix(".resume.pt"), weights_only=False)
    assert any(key.startswith("students.1.") for key in state["model"]) and "teacher_head.weight" in state["model"]
    log = json.loads(checkpoint.with_suffix(".log.jsonl").read_text().splitlines()[-1])
    assert log["kept_student"] == recorded["kept_student"]
    assert log["heldout_acc"] == recorded["students_heldout_acc"][recorded["kept_student"]]


# ----------------------------------------------------------------------------
# A cheap student through the exporter and a real tritonserver


def test_shift_student_repository_loads_and_answers_in_tritonserver(imagefolder, triton_venv, tmp_path):
    import numpy as np
    import tritonclient.http as httpclient

    from benchmarks.triton_launcher import TritonServer
    from common.manifest import read_manifest
    checkpoint = save_tiny_checkpoint(imagefolder, tmp_path / "shift.safetensors", conv="shift")
    repository = tmp_path / "model_repository"
    export_tiny(checkpoint, repository)
    model, _ = load_checkpoint(checkpoint)
    manifest = read_manifest(repository)
    assert [entry.macs for entry in manifest.exits] == [spec.macs for spec in model.exits]
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = [logits.numpy() for logits in model(torch.from_numpy(images))]
    with TritonServer(repository, triton_venv, log_path=tmp_path / "tritonserver.log") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        for entry, reference in zip(manifest.exits, expected):
            deployed = entry.exit_model
            assert client.is_model_ready(deployed.name, str(deployed.version))
            tensor = httpclient.InferInput("images", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer(deployed.name, [tensor], model_version=str(deployed.version))
            np.testing.assert_allclose(result.as_numpy("logits"), reference, atol=1e-4)
