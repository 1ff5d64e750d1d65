"""Offline sweep: thresholds calibrated on held-out data, measured on the test split.

For each target (accuracy drop or compute budget): test accuracy, mean MACs as a
fraction of the full network, the share of samples leaving at each exit, and the
latency predicted from the profiled per-exit costs. Plus every fixed exit and the
oracle (each sample at its first correct exit).
"""

from __future__ import annotations

import numpy as np

from benchmarks.calibrate import calibrate
from benchmarks.calibration import Outcome, evaluate, oracle
from benchmarks.exit_outputs import ExitOutputs
from common.manifest import Manifest

DEFAULT_DROPS_PT = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)


def stage_costs_ms(manifest: Manifest, batch: str) -> np.ndarray | None:
    """Per-image milliseconds of each segment at a profiled batch size (None if not profiled)."""
    costs = []
    for entry in manifest.exits:
        latency = entry.latency_ms.get("segment_model", {}).get(batch)
        if latency is None:
            return None
        costs.append(latency / int(batch))
    return np.asarray(costs)


def predicted_ms(manifest: Manifest, exits: np.ndarray, batch: str) -> float | None:
    """Mean per-image compute time if each sample runs the segments up to its exit."""
    costs = stage_costs_ms(manifest, batch)
    if costs is None:
        return None
    return float(np.cumsum(costs)[exits].mean())


def _row(kind: str, target, outcome: Outcome, manifest: Manifest, thresholds=None) -> dict:
    full = manifest.full_macs
    return {
        "kind": kind, "target": target, "test_acc": outcome.accuracy,
        "macs_fraction": outcome.mean_macs / full, "mean_macs": outcome.mean_macs,
        **{f"share_exit{entry.depth}": share for entry, share in zip(manifest.exits, outcome.exit_share)},
        "predicted_ms_b1": predicted_ms(manifest, outcome.exits, "1"),
        "predicted_ms_b64": predicted_ms(manifest, outcome.exits, "64"),
        "thresholds": None if thresholds is None else [round(float(t), 5) for t in thresholds],
    }


def offline_sweep(manifest: Manifest, heldout: ExitOutputs, test: ExitOutputs, score: str = "max_prob",
                  drops_pt=DEFAULT_DROPS_PT, budgets=DEFAULT_BUDGETS) -> list[dict]:
    macs = np.asarray([entry.macs for entry in manifest.exits], np.float64)
    test_scores, test_correct = test.scores(score), test.correct()
    rows = []
    for drop in drops_pt:
        thresholds, _ = calibrate(heldout, macs, score, max_drop=drop / 100, full_macs=manifest.full_macs)
        rows.append(_row("accuracy_drop", drop, evaluate(test_scores, test_correct, macs, thresholds), manifest,
                         thresholds))
    for budget in budgets:
        thresholds, _ = calibrate(heldout, macs, score, max_drop=None, macs_budget=budget,
                                  full_macs=manifest.full_macs)
        rows.append(_row("compute_budget", budget, evaluate(test_scores, test_correct, macs, thresholds), manifest,
                         thresholds))
    # A fixed exit is served by its per-exit model: no earlier heads to pay, and its own answer (no ensemble).
    standalone = np.asarray([entry.macs if entry.standalone_macs is None else entry.standalone_macs
                             for entry in manifest.exits], np.float64)
    stages = len(manifest.exits)
    for index, entry in enumerate(manifest.exits):
        fixed = [2.0] * stages
        fixed[index] = 0.0
        rows.append(_row("fixed_exit", entry.depth, evaluate(test_scores, test.own_correct(), standalone, fixed),
                         manifest))
    rows.append(_row("oracle", None, oracle(test_correct, macs), manifest))
    return rows
