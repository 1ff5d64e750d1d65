"""benchmarks.seed_curves on tiny real checkpoints: exported, swept, drawn on one plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.seed_curves import main
from common.errors import run_cli
from common.paths import DEFAULT_CHECKPOINT
from export.compose import StageSpec, compose_cascade

from .conftest import run_module, save_tiny_checkpoint

ROW_FIELDS = {"kind", "target", "test_acc", "macs_fraction", "mean_macs", "thresholds"}


@pytest.fixture(scope="module")
def curves_run(imagefolder, tmp_path_factory):
    """The CLI on a reference, a multi-exit ResNet, an anytime ensemble and a DelugeNet (checkpoints) and
    a composed cascade exported beforehand (a manifest path): a cheap student, then the same ResNet from the
    image."""
    root = tmp_path_factory.mktemp("seed-curves")
    checkpoints = {
        "reference": save_tiny_checkpoint(imagefolder, root / "reference.safetensors", seed=3),
        "resnet": save_tiny_checkpoint(imagefolder, root / "mwresnet8_3.safetensors"),
        "ensemble": save_tiny_checkpoint(imagefolder, root / "ensemble.safetensors", "mwresnet8_3_split2"),
        "deluge": save_tiny_checkpoint(imagefolder, root / "deluge.safetensors", "mwdelugenet29_3", width=8),
        "student": save_tiny_checkpoint(imagefolder, root / "student.safetensors", seed=5, conv="group:2"),
    }
    repository = root / "model_repository"
    compose_cascade([StageSpec(checkpoints["student"], "3,8"), StageSpec(checkpoints["resnet"])], "composed",
                    repository, validation_images=20, log=lambda message: None)
    output = root / "out"
    result = run_module("benchmarks.seed_curves", "--output", str(output), "--reference",
                        f"ref={checkpoints['reference']}", str(checkpoints["resnet"]),
                        f"anytime={checkpoints['ensemble']}", str(checkpoints["deluge"]),
                        "--manifest", str(repository / "manifest.json"), "--validation-images", "20", "--threads", "1",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, checkpoints, json.loads((output / "curves.json").read_text())


def test_every_model_gets_its_curve_in_order_with_provenance(curves_run):
    output, checkpoints, curves = curves_run
    assert {"command", "commit", "machine", "date", "score", "drops_pt", "budgets", "models"} <= set(curves)
    assert curves["command"].startswith("python -m benchmarks.seed_curves --output")
    models = curves["models"]
    assert [(m["name"], m["kind"], m["model"]) for m in models] == [
        ("ref", "reference", "mwresnet8_3"), ("mwresnet8_3", "checkpoint", "mwresnet8_3"),
        ("anytime", "checkpoint", "mwresnet8_3_split2"), ("deluge", "checkpoint", "mwdelugenet29_3"),
        ("composed", "manifest", "composed")]
    assert models[1]["checkpoint"] == str(checkpoints["resnet"])
    assert models[4]["manifest"].endswith("manifest.json")
    assert models[4]["checkpoint"] == str(checkpoints["student"])  # the first stage's: it names the held-out split
    assert [e["depth"] for e in models[4]["exits"]] == [3, 8, 11, 13, 16]  # the ResNet's 3, 5, 8 after 8 layers
    readme = (output / "README.md").read_text()
    assert curves["command"] in readme and curves["commit"] in readme and curves["machine"] in readme
    for model in models:
        assert f"`{model['name']}`" in readme
        assert model["images"] == {"heldout": 30, "test": 30}  # the checkpoints' 30 held-out, all 30 test


def test_costs_grow_with_depth_and_fixed_exits_cost_their_own_model(curves_run):
    for model in curves_run[2]["models"]:
        exits = model["exits"]
        assert len(exits) >= 2 and {"depth", "params", "macs", "standalone_macs", "heldout_acc"} <= set(exits[0])
        for key in ("depth", "params", "macs"):
            values = [e[key] for e in exits]
            assert values == sorted(set(values)), (model["name"], key, values)  # strictly increasing
        assert model["full_macs"] == (exits[-1]["standalone_macs"] or exits[-1]["macs"])  # no early heads
        fixed = [r for r in model["rows"] if r["kind"] == "fixed_exit"]
        assert [r["target"] for r in fixed] == [e["depth"] for e in exits]
        assert [r["mean_macs"] for r in fixed] == [e["standalone_macs"] or e["macs"] for e in exits]
        for row in model["rows"]:
            assert ROW_FIELDS <= set(row) and 0 <= row["test_acc"] <= 1
            cheapest = min(e["standalone_macs"] or e["macs"] for e in exits)
            assert cheapest * 0.999 <= row["mean_macs"] <= exits[-1]["macs"] * 1.001
            shares = [v for k, v in row.items() if k.startswith("share_exit")]
            assert len(shares) == len(exits) and sum(shares) == pytest.approx(1)


def test_oracle_bounds_every_fixed_exit(curves_run):
    for model in curves_run[2]["models"]:
        oracle = next(r for r in model["rows"] if r["kind"] == "oracle")
        fixed = [r for r in model["rows"] if r["kind"] == "fixed_exit"]
        assert oracle["test_acc"] >= max(r["test_acc"] for r in fixed)


def test_calibration_is_monotone_on_held_out_where_the_targets_apply(curves_run):
    """A looser target never costs more held-out MACs (one frontier for all targets), and a budget holds on
    the held-out split it was calibrated on unless no calibrated point fits it."""
    curves = curves_run[2]
    assert [r["target"] for r in curves["models"][0]["rows"] if r["kind"] == "accuracy_drop"] == curves["drops_pt"]
    for model in curves["models"]:
        drops = [r for r in model["rows"] if r["kind"] == "accuracy_drop"]
        budgets = [r for r in model["rows"] if r["kind"] == "compute_budget"]
        assert [r["target"] for r in budgets] == curves["budgets"]
        for rows, sign in ((drops, -1), (budgets, 1)):
            macs = np.array([r["heldout_macs_fraction"] for r in rows])
            accuracy = np.array([r["heldout_acc"] for r in rows])
            assert np.all(sign * np.diff(macs) >= -1e-12), (model["name"], macs)
            assert np.all(sign * np.diff(accuracy) >= -1e-12), (model["name"], accuracy)
        cheapest = min(r["heldout_macs_fraction"] for r in drops + budgets)
        for row in budgets:  # within the budget, or calibration's cheapest point when nothing fits
            assert row["heldout_macs_fraction"] <= row["target"] + 1e-9 or row["heldout_macs_fraction"] == cheapest


def test_fixed_exits_measure_what_pytorch_predicts(curves_run, imagefolder):
    """The swept test accuracy of each fixed exit is the checkpoint's own per-exit accuracy in PyTorch."""
    import torch

    from training.checkpoint import load_checkpoint
    from training.datasets import load_split
    from training.transforms import to_normalized

    _, checkpoints, curves = curves_run
    test = load_split(imagefolder, "test", cache_dir=None)
    for model in curves["models"][:4]:
        network, meta = load_checkpoint(checkpoints[{"ref": "reference", "mwresnet8_3": "resnet",
                                                     "anytime": "ensemble", "deluge": "deluge"}[model["name"]]])
        with torch.no_grad():
            logits = network(to_normalized(test.images, meta.normalization.mean, meta.normalization.std))
        expected = [float((exit_logits.argmax(1).numpy() == test.labels).mean()) for exit_logits in logits]
        fixed = [r["test_acc"] for r in model["rows"] if r["kind"] == "fixed_exit"]
        assert fixed == pytest.approx(expected, abs=1 / len(test) + 1e-9), model["name"]


def test_a_composed_cascade_serves_its_later_network_from_the_image(curves_run):
    """The composed cascade's later exits are the ResNet run again from the image: their fixed exits measure
    what the ResNet's own do, at the ResNet's own cost."""
    models = {model["name"]: model for model in curves_run[2]["models"]}
    composed, resnet = models["composed"], models["mwresnet8_3"]
    fixed = [r for r in composed["rows"] if r["kind"] == "fixed_exit"][2:]
    alone = [r for r in resnet["rows"] if r["kind"] == "fixed_exit"]
    assert [r["test_acc"] for r in fixed] == [r["test_acc"] for r in alone]
    assert [r["mean_macs"] for r in fixed] == [r["mean_macs"] for r in alone]
    assert composed["full_macs"] == resnet["full_macs"]
    student_macs = composed["exits"][1]["macs"]  # reaching the ResNet's exits through the cascade pays for both
    assert [e["macs"] for e in composed["exits"][2:]] == [e["macs"] + student_macs for e in resnet["exits"]]


def test_the_plot_is_a_png_with_every_model(curves_run):
    import matplotlib.image

    output = curves_run[0]
    path = output / "accuracy_vs_macs.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 600 and height > 400


def test_bad_models_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    assert run_cli(main, ["--output", str(tmp_path), "--no-reference", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert run_cli(main, ["--output", str(tmp_path), "--no-reference", "--manifest", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert run_cli(main, ["--output", str(tmp_path), "--no-reference"]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert run_cli(main, ["--output", str(tmp_path), "--no-reference", "--limit", "-1", str(tiny_checkpoint)]) == 2
    assert run_cli(main, ["--output", str(tmp_path), str(tiny_checkpoint), f"mwresnet56_5={tiny_checkpoint}"]) == 2
    assert "two models are named mwresnet56_5" in capsys.readouterr().err  # found before any export


def test_limit_and_linear_axis(tiny_checkpoint, tmp_path):
    assert main(["--output", str(tmp_path), "--no-reference", "--limit", "10", "--linear-x", "--validation-images",
                 "10", "--threads", "1", f"tiny={tiny_checkpoint}"]) == 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves["limit"] == 10 and curves["models"][0]["images"] == {"heldout": 10, "test": 10}
    assert "Only the first 10 images of each split." in (tmp_path / "README.md").read_text()
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 10_000


def test_paths_inside_the_repository_are_recorded_relative_to_it():
    from benchmarks.seed_curves import shown

    assert shown(DEFAULT_CHECKPOINT) == "checkpoints/mwresnet56_5.safetensors"
    assert shown("/elsewhere/model.safetensors") == "/elsewhere/model.safetensors" and shown(None) is None
