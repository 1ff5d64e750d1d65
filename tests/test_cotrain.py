"""Divide and co-training: members and their width, the co-training loss, the anytime
ensemble's exits, training from the command line, export and a gateway round trip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.http as httpclient

from common.errors import UserError
from common.manifest import FEATURES_OUTPUT, read_manifest
from common.onnxruntime_session import create_session
from training.cotrain import AnytimeEnsemble, CoTrainingLoss, jensen_shannon, member_width, parse_split_name
from training.models import create_model

from .conftest import GatewayProcess, export_tiny, run_module, save_tiny_checkpoint


def test_members_are_narrower_copies_that_cost_about_the_original():
    assert parse_split_name("mwresnet20_3_split2") == ("mwresnet20_3", 2)
    assert parse_split_name("mwresnet20_3") is None
    assert member_width(16, 2) == 11 and member_width(16, 4) == 8 and member_width(32, 2) == 23
    whole = create_model("mwresnet20_3")
    for splits in (2, 4):
        ensemble = create_model(f"mwresnet20_3_split{splits}")
        assert isinstance(ensemble, AnytimeEnsemble) and len(ensemble.exits) == splits
        assert [stage.member.stem.out_channels for stage in ensemble.segments] == [member_width(16, splits)] * splits
        # Together the members cost within 10% of the undivided network (widths are rounded).
        assert ensemble.exits[-1].macs / whole.exits[-1].macs == pytest.approx(1.0, abs=0.1)
        assert ensemble.exits[-1].params / whole.exits[-1].params == pytest.approx(1.0, abs=0.1)
        # Exit k has paid for members 0..k.
        macs = [spec.macs for spec in ensemble.exits]
        assert macs[-1] == pytest.approx(splits * macs[0], rel=0.01)
    with pytest.raises(UserError, match="_split"):
        create_model("nonet_split2")
    with pytest.raises(UserError, match="at least 2"):
        create_model("mwresnet8_3_split1")


def test_exit_k_is_the_average_of_members_0_to_k():
    torch.manual_seed(0)
    ensemble = create_model("mwresnet8_3_split3", num_classes=5, width=4).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        exits = ensemble(images)
        members = [F.softmax(logits, dim=1) for logits in ensemble.member_logits([images] * 3)]
    for k, logits in enumerate(exits):
        expected = torch.stack(members[: k + 1]).mean(dim=0)
        torch.testing.assert_close(logits.exp(), expected, atol=1e-6, rtol=1e-5)
    # forward_until hands the next stage the image and the running sum, nothing else.
    with torch.no_grad():
        _, packed = ensemble.forward_until(0, images)
    assert packed.shape == (4, 3 * 32 * 32 + 5)
    torch.testing.assert_close(packed[:, :-5], images.flatten(1))


def test_co_training_loss_reaches_every_member_and_warms_up():
    torch.manual_seed(0)
    ensemble = create_model("mwresnet8_3_split2", num_classes=3, width=4)
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = CoTrainingLoss(weight=0.5, warmup_epochs=4)
    assert [loss_fn.weight_at(e) for e in (0, 2, 4, 10)] == [0.0, 0.25, 0.5, 0.5]
    logits = ensemble.member_logits(views)
    loss = loss_fn(logits, targets, epoch=10)
    loss.backward()
    for stage in ensemble.segments:
        assert stage.member.stem.weight.grad is not None and stage.member.stem.weight.grad.abs().sum() > 0
    # The agreement term: zero for identical members, positive otherwise, and it pulls members together.
    p = F.softmax(torch.randn(6, 3), dim=1)
    assert float(jensen_shannon([p, p])) == pytest.approx(0.0, abs=1e-6)
    q = F.softmax(torch.randn(6, 3), dim=1)
    assert float(jensen_shannon([p, q])) > 0
    without = CoTrainingLoss(weight=0.0)(logits, targets, epoch=10)
    assert float(loss.detach()) > float(without.detach())


def test_co_training_from_the_command_line_records_the_members(imagefolder, tmp_path):
    output = tmp_path / "split.safetensors"
    result = run_module("training.train", "--model", "mwresnet8_3_split2", "--width", "4", "--heldout-size", "30",
                        "--batch-size", "45", "--no-progress", "--threads", "1", "--epochs", "1",
                        "--agreement-weight", "0.3", "--agreement-warmup", "0",
                        "--data", str(imagefolder), "--output", str(output))
    assert result.returncode == 0, result.stderr
    from training.checkpoint import load_checkpoint, load_metadata

    meta = load_metadata(output)
    assert meta.model == "mwresnet8_3_split2" and [e.depth for e in meta.exits] == [8, 16]
    assert meta.training["agreement_weight"] == 0.3
    model, _ = load_checkpoint(output)
    assert isinstance(model, AnytimeEnsemble)


@pytest.fixture(scope="module")
def ensemble_repository(imagefolder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    checkpoint = save_tiny_checkpoint(imagefolder, root / "split.safetensors", "mwresnet8_3_split2")
    export_tiny(checkpoint, root / "model_repository")
    return root / "model_repository"


def test_tiny_ensemble_exports_and_serves_as_an_anytime_cascade(ensemble_repository, tmp_path):
    manifest = read_manifest(ensemble_repository)
    assert manifest.model == "mwresnet8_3_split2" and manifest.exit_depths == [8, 16]
    # What crosses the stage boundary: the image and the running sum of probabilities.
    assert manifest.exits[0].segment_model.output(FEATURES_OUTPUT).shape == [3 * 32 * 32 + 3]
    images = np.random.default_rng(5).standard_normal((5, *manifest.input.shape)).astype(np.float32)
    final = manifest.exits[-1].exit_model
    # The last per-exit model holds both members side by side (the `full` policy's graph).
    whole = create_session(str(ensemble_repository / final.name / str(final.version) / "model.onnx"))
    expected = whole.run(None, {"images": images})[0]
    with GatewayProcess(ensemble_repository, log_path=tmp_path / "gateway.log") as gateway:
        client = httpclient.InferenceServerClient(gateway.http_url)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        full = client.infer("mwresnet8_3_split2", [tensor], parameters={"policy": "full"})
        first = client.infer("mwresnet8_3_split2", [tensor], parameters={"policy": "fixed", "exit_depth": 8})
        anytime = client.infer("mwresnet8_3_split2", [tensor], parameters={"threshold": 0.0})
    # Members run one after the other through the segments, or side by side in one graph: same answer.
    np.testing.assert_allclose(full.as_numpy("logits"), expected, atol=1e-4)
    assert full.as_numpy("exit_depth").tolist() == [16] * 5
    assert first.as_numpy("exit_depth").tolist() == [8] * 5
    np.testing.assert_allclose(anytime.as_numpy("logits"), first.as_numpy("logits"), atol=1e-5)


def test_the_full_policy_runs_the_members_side_by_side(ensemble_repository):
    import onnxruntime

    from serving.backends import OnnxRuntimeBackend

    manifest = read_manifest(ensemble_repository)
    assert [entry.exit_model.parallel_branches for entry in manifest.exits] == [1, 2]
    assert all(entry.segment_model.parallel_branches == 1 for entry in manifest.exits)
    backend = OnnxRuntimeBackend(ensemble_repository, manifest, device="cpu")
    parallel = backend.exit_sessions[-1]
    assert parallel.get_session_options().execution_mode == onnxruntime.ExecutionMode.ORT_PARALLEL
    final = manifest.exits[-1].exit_model
    sequential = create_session(str(ensemble_repository / final.name / str(final.version) / "model.onnx"))
    assert sequential.get_session_options().execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    images = np.random.default_rng(6).standard_normal((7, *manifest.input.shape)).astype(np.float32)
    np.testing.assert_allclose(backend.run_exit(1, images), sequential.run(None, {"images": images})[0], atol=1e-6)
