"""Per-exit temperature scaling (training.temperature) on synthetic logits and a tiny real checkpoint."""

import torch

from tests.conftest import run_module
from training.checkpoint import load_checkpoint
from training.models import ConvExitHead, ExitHead
from training.temperature import fit_temperature, fold_temperature


def test_temperature_of_miscalibrated_logits_is_recovered():
    torch.manual_seed(0)
    true_logits = torch.randn(20000, 10) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1).squeeze(1)  # calibrated by construction
    for scale in (0.5, 1.0, 3.0):
        assert abs(fit_temperature(true_logits * scale, labels) - scale) < 0.05 * scale


def test_folding_divides_the_logits_and_keeps_the_predictions():
    torch.manual_seed(0)
    for head in (ExitHead(8, 5), ConvExitHead(8, 5, spatial=16)):
        head.eval()
        x = torch.randn(4, 8, 16, 16)
        before = head(x)
        fold_temperature(head, 2.5)
        torch.testing.assert_close(head(x), before / 2.5)
        assert torch.equal(head(x).argmax(1), before.argmax(1))


def test_cli_calibrates_the_early_exits_only(tiny_checkpoint, imagefolder, tmp_path):
    output = tmp_path / "calibrated.safetensors"
    result = run_module("training.temperature", "--checkpoint", str(tiny_checkpoint), "--data", str(imagefolder),
                        "--output", str(output))
    assert result.returncode == 0, result.stderr
    original, _ = load_checkpoint(tiny_checkpoint)
    model, meta = load_checkpoint(output)
    fitted = meta.training["temperatures"]["exits"]
    assert [entry["depth"] for entry in fitted] == original.exit_depths[:-1]
    assert all(entry["heldout_nll_after"] <= entry["heldout_nll_before"] + 1e-9 for entry in fitted)
    for k, entry in enumerate(fitted):
        torch.testing.assert_close(model.heads[k].fc.weight, original.heads[k].fc.weight / entry["temperature"])
    assert torch.equal(model.heads[-1].fc.weight, original.heads[-1].fc.weight)
    again = run_module("training.temperature", "--checkpoint", str(output), "--data", str(imagefolder),
                       "--output", str(tmp_path / "twice.safetensors"))
    assert again.returncode != 0 and "already temperature-scaled" in again.stderr


def test_cli_final_scales_every_exit_for_the_front_of_a_composed_cascade(tiny_checkpoint, imagefolder, tmp_path):
    output = tmp_path / "front.safetensors"
    result = run_module("training.temperature", "--checkpoint", str(tiny_checkpoint), "--data", str(imagefolder),
                        "--output", str(output), "--final")
    assert result.returncode == 0, result.stderr
    original, _ = load_checkpoint(tiny_checkpoint)
    model, meta = load_checkpoint(output)
    fitted = meta.training["temperatures"]["exits"]
    assert [entry["depth"] for entry in fitted] == original.exit_depths
    torch.testing.assert_close(model.heads[-1].fc.weight, original.heads[-1].fc.weight / fitted[-1]["temperature"])
