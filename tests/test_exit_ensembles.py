"""Exit ensembles (issue 20): each exit answers with a weighted sum of its and the earlier exits'
log-probabilities. The step the gateway and the Triton cascade model apply, the fit on held-out
outputs, the manifest field, the offline outputs and calibration's choice. The served paths (the
gateway's cascade, the gateway process, the Triton cascade model on the real tritonserver) are tested
on the composed repository in tests/test_image_stages.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.special import log_softmax as reference_log_softmax

from benchmarks.calibrate import apply_thresholds, calibrate_ensembles
from benchmarks.ensembles import fit_ensembles
from benchmarks.exit_outputs import ExitOutputs
from common.manifest import MANIFEST_FILE, Manifest, ManifestError, read_manifest
from serving.policy import ensemble_step, exit_plan, log_softmax


def _views(n=3000, classes=10, strengths=(1.0, 1.5, 2.5), seed=0):
    """Exits whose logits are independent noisy views of the label (stronger = more accurate)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = np.stack([rng.normal(0, 1, (n, classes)) + strength * np.eye(classes)[labels] for strength in strengths])
    return logits.astype(np.float32), labels


def test_the_step_is_the_weighted_sum_of_log_probabilities_and_carries_them():
    logits, _ = _views(n=5)
    weights = [np.array([2.0], np.float32), np.array([0.5, 1.0], np.float32), np.array([0.0, 0.3, 0.9], np.float32)]
    history, expected_history = None, []
    for k, w in enumerate(weights):
        answer, history = ensemble_step(w, logits[k], history)
        expected_history.append(reference_log_softmax(logits[k].astype(np.float64), axis=-1))
        expected = sum(weight * lp for weight, lp in zip(w, expected_history))
        assert answer.dtype == np.float32 and history.dtype == np.float32 and history.shape == (k + 1, 5, 10)
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_softmax(logits[0]), expected_history[0], atol=1e-5)
    # exit 0 alone with weight 1 answers its own log-probabilities: the same argmax and softmax as its logits
    alone, _ = ensemble_step(np.array([1.0], np.float32), logits[0], None)
    assert (alone.argmax(1) == logits[0].argmax(1)).all()
    with pytest.raises(ValueError, match="2 ensemble weights for 3 exits"):
        ensemble_step(np.array([1.0, 1.0], np.float32), logits[2], history[:2])


def test_the_fit_weighs_informative_exits_and_ignores_noise():
    logits, labels = _views()
    weights = fit_ensembles(logits, labels)
    assert [len(w) for w in weights] == [1, 2, 3] and all(min(w) >= 0 for w in weights)
    # independent views: every exit's ensemble leans on the earlier ones and beats the exit alone
    assert weights[2][0] > 0.1 and weights[2][1] > 0.1
    for k, w in enumerate(weights):
        lp = reference_log_softmax(logits[: k + 1].astype(np.float64), axis=-1)
        ensemble = reference_log_softmax(np.tensordot(w, lp, axes=1), axis=-1)
        alone = reference_log_softmax(logits[k].astype(np.float64), axis=-1)
        rows = np.arange(len(labels))
        assert -ensemble[rows, labels].mean() <= -alone[rows, labels].mean() + 1e-9
    # an exit of pure noise earns (almost) nothing
    noise = logits.copy()
    noise[0] = np.random.default_rng(1).normal(0, 1, noise[0].shape)
    assert fit_ensembles(noise, labels)[2][0] < 0.05


def test_offline_outputs_answer_as_the_served_step_and_measure_drops_against_the_final_exit_alone():
    logits, labels = _views(n=400)
    weights = fit_ensembles(logits, labels)
    outputs = ExitOutputs(logits, labels, tuple(weights))
    served = outputs.served()
    history = None
    for k, w in enumerate(weights):
        answer, history = ensemble_step(np.asarray(w, np.float32), logits[k], history)
        np.testing.assert_array_equal(served[k], answer)
    assert (outputs.correct() == (served.argmax(2) == labels)).all()
    assert (outputs.own_correct() == (logits.argmax(2) == labels)).all()
    drop = outputs.drop_correct()
    assert drop.shape == (4, 400) and (drop[-1] == outputs.own_correct()[-1]).all()
    assert outputs.with_ensembles(None).served() is logits


def test_calibration_keeps_ensembles_only_when_they_take_fewer_macs_out_of_fold():
    logits, labels = _views(n=4000, strengths=(1.2, 1.8, 2.4))
    outputs = ExitOutputs(logits, labels)
    macs = [1.0, 2.0, 4.0]
    options = {"max_drop": 0.01, "full_macs": 4.0}
    chosen, thresholds, details = calibrate_ensembles(outputs, macs, "auto", **options)
    compared = details["ensemble"]["out_of_fold_with_without"]
    # independent views ensemble well: with them the target is met with fewer MACs, and they are kept
    assert compared["with"] < compared["without"] and details["ensemble"]["used"] and chosen.ensembles is not None
    assert len(thresholds) == 3
    off, _, off_details = calibrate_ensembles(outputs, macs, "off", **options)
    assert off.ensembles is None and off_details["ensemble"] == {"mode": "off", "used": False}
    on, _, _ = calibrate_ensembles(outputs, macs, "on", **options)
    assert on.ensembles == chosen.ensembles
    # auto with a compute budget (no out-of-fold measure): off
    budget, _, budget_details = calibrate_ensembles(outputs, macs, "auto", max_drop=None, macs_budget=0.5,
                                                    full_macs=4.0)
    assert budget.ensembles is None and not budget_details["ensemble"]["used"]


def test_the_manifest_carries_ensembles_and_refuses_inconsistent_ones(tiny_repository, tmp_path):
    manifest = read_manifest(tiny_repository)
    stages = len(manifest.exits)
    weights = [[0.2] * k + [1.0] for k in range(stages)]
    with_ensembles = apply_thresholds(manifest, [0.5] * stages, {}, ensembles=weights)
    data = with_ensembles.to_dict()
    assert [entry["ensemble"] for entry in data["exits"]] == weights
    assert Manifest.from_dict(json.loads(json.dumps(data))) == with_ensembles
    plan = exit_plan(with_ensembles)
    assert all(np.allclose(w, expected) for w, expected in zip(plan.ensembles, weights, strict=True))
    # kept by a later calibration that does not say otherwise, dropped when it says None
    assert apply_thresholds(with_ensembles, [0.4] * stages, {}).exits[1].ensemble == weights[1]
    plain = apply_thresholds(with_ensembles, [0.4] * stages, {}, ensembles=None)
    assert exit_plan(plain).ensembles is None and all("ensemble" not in entry for entry in plain.to_dict()["exits"])
    raw = json.loads((tiny_repository / MANIFEST_FILE).read_text())
    assert all("ensemble" not in entry for entry in raw["exits"])  # manifests without them read unchanged
    for change, message in [
        (lambda exits: exits[0].pop("ensemble"), "either every exit"),
        (lambda exits: exits[1].update(ensemble=[1.0]), "must be 2 finite non-negative"),
        (lambda exits: exits[1].update(ensemble=[-0.1, 1.0]), "must be 2 finite non-negative"),
        (lambda exits: exits[1].update(ensemble=[True, 1.0]), "must be 2 finite non-negative"),
    ]:
        broken = json.loads(json.dumps(data))
        change(broken["exits"])
        with pytest.raises(ManifestError, match=message):
            Manifest.from_dict(broken)


def test_calibrate_cli_writes_the_chosen_ensembles(tiny_repository, tmp_path):
    from .conftest import run_module

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    result = run_module("benchmarks.calibrate", "--model-repository", str(repository), "--ensemble", "on",
                        "--max-drop", "5", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "exit ensembles: fitted and used" in result.stdout
    manifest = read_manifest(repository)
    assert all(entry.ensemble is not None and len(entry.ensemble) == k + 1 for k, entry in enumerate(manifest.exits))
    assert manifest.calibration["ensemble"] == {"mode": "on", "used": True}
    result = run_module("benchmarks.calibrate", "--model-repository", str(repository), "--ensemble", "off",
                        "--max-drop", "5", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert all(entry.ensemble is None for entry in read_manifest(repository).exits)


def test_out_of_fold_measures_refit_ensembles_on_each_calibration_half():
    from benchmarks.calibration import fold_curves

    logits, labels = _views(n=600)
    outputs = ExitOutputs(logits, labels)
    scores, correct = outputs.scores(), outputs.drop_correct()
    halves = []

    def refit(indices):
        halves.append(np.sort(indices))
        return scores, correct  # the same arrays: the curves must be those of no refit

    curves = fold_curves(scores, correct, [1.0, 2.0, 4.0], repeats=2, seed=5, refit=refit)
    plain = fold_curves(scores, correct, [1.0, 2.0, 4.0], repeats=2, seed=5)
    assert len(halves) == 4 and all(len(half) == 300 for half in halves)
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(range(600))
    for a, b in zip(curves, plain, strict=True):
        np.testing.assert_array_equal(a.macs, b.macs)
        np.testing.assert_array_equal(a.drop, b.drop)
    # calibration with ensembles refits them per half and says so
    _, _, details = calibrate_ensembles(outputs, [1.0, 2.0, 4.0], "on", max_drop=0.01, full_macs=4.0)
    assert "refitted on each calibration half" in details["margin_selection"]["rule"]
