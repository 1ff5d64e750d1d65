"""Out-of-fold drops of the served cascade's calibration, per margin (issue 20; held-out split only).

    .venv/bin/python checkpoints/experiments/margin-rule/out_of_fold.py [--model-repository model_repository]

For each margin of `benchmarks.calibration.MARGIN_GRID`: the 20 trials of `select_margin` (10 random
halvings of the held-out split, calibrate on one half, measure on the other, both ways), with the exit
ensembles refitted on each calibration half, the exits alone, and a learned stopping score (a logistic
regression per exit on the exit's max-probability, top-2 margin, entropy and its agreement with every
earlier exit, fitted on the calibration half) in place of the max-probability. Prints the mean drop, its
spread, the share of trials within the target and the mean MACs. The test split is not read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, softmax

from benchmarks.calibrate import _refit_ensembles
from benchmarks.calibration import MARGIN_GRID, fold_curves, out_of_fold_trials
from benchmarks.ensembles import fit_ensembles
from benchmarks.exit_outputs import ExitOutputs, compute_exit_outputs, load_images
from common.manifest import read_manifest

TARGET = 0.005


def gate_features(outputs: ExitOutputs) -> list[np.ndarray]:
    probabilities = softmax(outputs.served().astype(np.float64), axis=-1)
    features = []
    for k, p in enumerate(probabilities):
        top = np.sort(p, axis=1)
        entropy = -(np.clip(p, 1e-12, 1) * np.log(np.clip(p, 1e-12, 1))).sum(axis=1)
        answer = p.argmax(axis=1)
        columns = [top[:, -1], top[:, -1] - top[:, -2], entropy, np.log(top[:, -1] + 1e-9)]
        for earlier in probabilities[:k]:
            columns += [(earlier.argmax(axis=1) == answer).astype(float), earlier[np.arange(len(answer)), answer]]
        features.append(np.stack(columns, axis=1))
    return features


def fit_logistic(x: np.ndarray, y: np.ndarray):
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9

    def design(values):
        return np.c_[(values - mean) / scale, np.ones(len(values))]

    z = design(x)

    def objective(w):
        logits = z @ w
        penalty = 1e-3 * (w[:-1] ** 2).sum()
        gradient = z.T @ (expit(logits) - y) / len(y) + np.r_[2e-3 * w[:-1], 0.0]
        return (np.logaddexp(0, logits) - y * logits).mean() + penalty, gradient

    weights = minimize(objective, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return lambda values: expit(design(values) @ weights)


def gate_refit(plain: ExitOutputs):
    def refit(indices: np.ndarray):
        outputs = plain.with_ensembles(fit_ensembles(plain.logits[:, indices], plain.labels[indices]))
        features, correct = gate_features(outputs), outputs.correct()
        scores = np.stack([fit_logistic(f[indices], c[indices].astype(float))(f) for f, c in zip(features, correct)])
        return scores, outputs.drop_correct()
    return refit


def table(name: str, scores, correct, macs, full_macs: float, refit) -> None:
    curves = fold_curves(scores, correct, macs, 10, refit=refit)
    for margin in MARGIN_GRID[:7]:
        drops, spent = out_of_fold_trials(curves, TARGET, margin)
        drops, spent = drops * 100, spent / full_macs * 100
        print(f"| {name} | {margin:g} | {drops.mean():.2f} | {drops.std():.2f} | {(drops > TARGET * 100).sum()} "
              f"| {np.mean(drops <= TARGET * 100 + 1e-10) * 100:.0f}% | {np.mean(spent):.1f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args()
    manifest = read_manifest(args.model_repository)
    images, labels = load_images(manifest, "heldout")
    plain = compute_exit_outputs(args.model_repository, manifest, images, labels, progress=False).with_ensembles(None)
    macs = np.array([entry.macs for entry in manifest.exits], np.float64)
    fitted = plain.with_ensembles(fit_ensembles(plain.logits, plain.labels))
    print("| stopping score | margin | mean drop (pt) | s.d. | trials over 0.5 pt (of 20) | trials within "
          "| mean MACs |\n|---|---:|---:|---:|---:|---:|---:|")
    table("max-probability, exit ensembles", fitted.scores(), fitted.drop_correct(), macs, manifest.full_macs,
          _refit_ensembles(plain, "max_prob"))
    table("max-probability, exits alone", plain.scores(), plain.drop_correct(), macs, manifest.full_macs, None)
    features = gate_features(fitted)
    in_sample = np.stack([fit_logistic(f, c.astype(float))(f) for f, c in zip(features, fitted.correct())])
    table("learned score, exit ensembles", in_sample, fitted.drop_correct(), macs, manifest.full_macs,
          gate_refit(plain))


if __name__ == "__main__":
    main()
