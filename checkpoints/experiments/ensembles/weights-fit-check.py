"""Does fitting the exit ensembles' weights on all of the held-out split, then measuring thresholds out of
fold (2-fold, 10 halvings), flatter the out-of-fold drop? Against weights refitted on each calibration half.

    .venv/bin/python checkpoints/experiments/ensembles/weights-fit-check.py model_repository \
        > checkpoints/experiments/ensembles/weights-fit-check.txt

Held-out split only (the repository's manifest names the checkpoint whose split it is).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from benchmarks.calibration import _drop_and_error, exits_taken, threshold_frontier
from benchmarks.ensembles import fit_ensembles
from benchmarks.exit_outputs import ExitOutputs, compute_exit_outputs, load_images
from common.manifest import read_manifest

MAX_DROP = 0.005


def curve(logits, labels, macs, fit, other, weights) -> np.ndarray:
    """Per frontier point of the `fit` half: its drop and standard error there, its drop and MACs on `other`."""
    fitted = ExitOutputs(logits[:, fit], labels[fit], tuple(weights))
    measured = ExitOutputs(logits[:, other], labels[other], tuple(weights))
    correct, other_correct, other_scores = fitted.drop_correct(), measured.drop_correct(), measured.scores()
    rows = []
    for thresholds, outcome in threshold_frontier(fitted.scores(), correct, macs):
        drop, error = _drop_and_error(correct[-1].astype(float) - correct[outcome.exits, np.arange(len(fit))])
        exits = exits_taken(other_scores, thresholds)
        rows.append((drop, error, other_correct[-1].mean() - other_correct[exits, np.arange(len(other))].mean(),
                     macs[exits].mean()))
    return np.array(rows)


def main() -> None:
    repository = Path(sys.argv[1] if len(sys.argv) > 1 else "model_repository")
    manifest = read_manifest(repository)
    outputs = compute_exit_outputs(repository, manifest, *load_images(manifest, "heldout"), progress=False)
    logits, labels = outputs.logits, outputs.labels
    macs = np.array([entry.macs for entry in manifest.exits], float)
    on_all = fit_ensembles(logits, labels)
    curves: dict[str, list] = {"all": [], "half": []}
    for repeat in range(10):
        order = np.random.default_rng(repeat).permutation(len(labels))
        halves = (order[: len(order) // 2], order[len(order) // 2:])
        for fit, other in (halves, halves[::-1]):
            curves["all"].append(curve(logits, labels, macs, fit, other, on_all))
            curves["half"].append(curve(logits, labels, macs, fit, other, fit_ensembles(logits[:, fit], labels[fit])))
    print(f"model {manifest.model}, {len(labels)} held-out images, target {MAX_DROP * 100:g} pt, 10 halvings")
    for key, found in curves.items():
        for margin in (0.5, 1, 1.5, 2):
            drops, spent = [], []
            for points in found:
                feasible = np.flatnonzero(points[:, 0] + margin * points[:, 1] <= MAX_DROP + 1e-12)
                index = feasible[0] if len(feasible) else len(points) - 1
                drops.append(points[index, 2])
                spent.append(points[index, 3])
            print(f"weights fitted on {key:4}: margin {margin}: out-of-fold drop {np.mean(drops) * 100:.2f} pt "
                  f"at {np.mean(spent) / manifest.full_macs * 100:.1f}% MACs")


if __name__ == "__main__":
    main()
