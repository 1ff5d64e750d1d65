"""Exit thresholds from per-exit scores on held-out data (pure numpy, no I/O).

Arrays are indexed [exit, sample]: `scores` (confidence, higher = surer) and
`correct` (whether that exit's prediction is right). A sample leaves at the first
exit whose score reaches the exit's threshold; the last exit always answers.

- `calibrate_accuracy_drop`: lowest mean MACs with held-out accuracy at most
  `max_drop` below the final exit's.
- `calibrate_compute_budget`: best held-out accuracy with mean MACs within a budget.
  Both pick a point on one greedy trade-off path over per-exit thresholds (so the
  chosen point only gets cheaper as the target loosens), then polish it one exit
  at a time.
- `calibrate_with_guarantee`: Learn-then-Test (Angelopoulos et al., 2021). For one
  threshold shared by the early exits, scanned from strict to lax over a grid fixed
  before seeing data, each candidate is tested with an exact binomial p-value for
  "the rate of samples the final exit gets right and the cascade gets wrong exceeds
  `max_drop`"; testing stops at the first candidate not rejected at level `delta`
  (fixed-sequence testing controls the family-wise error). That rate bounds the
  accuracy drop from above, so with probability at least 1 - delta over the draw of
  the held-out set, the expected accuracy drop on new data from the same
  distribution (i.i.d. or exchangeable with the held-out set) is at most `max_drop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 2.0  # a threshold no score reaches (scores lie in [0, 1])


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    mean_macs: float
    exit_share: tuple[float, ...]  # fraction of samples leaving at each exit
    exits: np.ndarray  # exit index per sample


def exits_taken(scores: np.ndarray, thresholds) -> np.ndarray:
    """Index of the exit each sample leaves at."""
    stops = scores >= np.asarray(thresholds, dtype=np.float64)[:, None]
    stops[-1] = True
    return stops.argmax(axis=0)


def evaluate(scores: np.ndarray, correct: np.ndarray, macs, thresholds) -> Outcome:
    exits = exits_taken(scores, thresholds)
    samples = np.arange(scores.shape[1])
    accuracy = float(correct[exits, samples].mean())
    mean_macs = float(np.asarray(macs, np.float64)[exits].mean())
    share = np.bincount(exits, minlength=scores.shape[0]) / scores.shape[1]
    return Outcome(accuracy, mean_macs, tuple(float(s) for s in share), exits)


def oracle(correct: np.ndarray, macs) -> Outcome:
    """Each sample leaves at its first correct exit (the last if none is): the bound any policy meets."""
    any_correct = correct.any(axis=0)
    exits = np.where(any_correct, correct.argmax(axis=0), correct.shape[0] - 1)
    share = np.bincount(exits, minlength=correct.shape[0]) / correct.shape[1]
    mean_macs = float(np.asarray(macs, np.float64)[exits].mean())
    return Outcome(float(any_correct.mean()), mean_macs, tuple(float(s) for s in share), exits)


def _candidates(scores: np.ndarray, count: int) -> list[np.ndarray]:
    """Per early exit, candidate thresholds from strict (NEVER) to lax, over score quantiles."""
    grids = []
    for row in scores[:-1]:
        quantiles = np.unique(np.quantile(row, np.linspace(1.0, 0.0, count)))[::-1]
        grids.append(np.concatenate([[NEVER], quantiles]))
    return grids


def _thresholds(grids, position) -> np.ndarray:
    return np.array([g[p] for g, p in zip(grids, position)] + [0.0])


def trade_off_path(scores, correct, macs, grids) -> list[tuple[tuple[int, ...], Outcome]]:
    """Greedy path from every early exit closed to every early exit wide open.

    Each step relaxes one exit by one grid position: a step that loses no accuracy
    first, else the one that saves the most MACs per accuracy lost. Mean MACs
    never rise along it, since relaxing a threshold only moves samples earlier.
    """
    position = [0] * len(grids)
    current = evaluate(scores, correct, macs, _thresholds(grids, position))
    path = [(tuple(position), current)]
    while True:
        best = None
        for exit_index, grid in enumerate(grids):
            if position[exit_index] + 1 >= len(grid):
                continue
            trial = list(position)
            trial[exit_index] += 1
            outcome = evaluate(scores, correct, macs, _thresholds(grids, trial))
            saved, lost = current.mean_macs - outcome.mean_macs, current.accuracy - outcome.accuracy
            key = (1, -lost, saved) if lost <= 1e-12 else (0, saved / lost, 0.0)
            if best is None or key > best[0]:
                best = (key, trial, outcome)
        if best is None:
            return path
        _, position, current = best
        path.append((tuple(position), current))


def _refine(scores, correct, macs, grids, position, current: Outcome, feasible, objective, rounds: int = 3):
    """Coordinate search around a path point: any single exit's grid value that scores better and stays feasible."""
    position = list(position)
    for _ in range(rounds):
        improved = False
        for exit_index, grid in enumerate(grids):
            for value in range(len(grid)):
                if value == position[exit_index]:
                    continue
                trial = list(position)
                trial[exit_index] = value
                outcome = evaluate(scores, correct, macs, _thresholds(grids, trial))
                if feasible(outcome) and objective(outcome) > objective(current):
                    position, current, improved = trial, outcome, True
        if not improved:
            break
    return _thresholds(grids, position)


def calibrate_accuracy_drop(scores, correct, macs, max_drop: float, candidates: int = 100) -> np.ndarray:
    """Thresholds that save the most MACs with accuracy >= final exit's - max_drop."""
    floor = correct[-1].mean() - max_drop - 1e-12
    grids = _candidates(scores, candidates)
    path = trade_off_path(scores, correct, macs, grids)
    feasible = [(pos, out) for pos, out in path if out.accuracy >= floor] or path[:1]
    position, outcome = min(feasible, key=lambda item: (item[1].mean_macs, -item[1].accuracy))
    return _refine(scores, correct, macs, grids, position, outcome, lambda o: o.accuracy >= floor,
                   lambda o: (-o.mean_macs, o.accuracy))


def calibrate_compute_budget(scores, correct, macs, max_mean_macs: float, candidates: int = 100) -> np.ndarray:
    """Thresholds with the best accuracy whose mean MACs stay within the budget (the cheapest if none do)."""
    grids = _candidates(scores, candidates)
    path = trade_off_path(scores, correct, macs, grids)
    within = [(pos, out) for pos, out in path if out.mean_macs <= max_mean_macs + 1e-9]
    if not within:
        position, outcome = min(path, key=lambda item: item[1].mean_macs)
        return _thresholds(grids, position)
    position, outcome = max(within, key=lambda item: (item[1].accuracy, -item[1].mean_macs))
    return _refine(scores, correct, macs, grids, position, outcome, lambda o: o.mean_macs <= max_mean_macs + 1e-9,
                   lambda o: (o.accuracy, -o.mean_macs))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k); scipy (the bench extra) is imported only when a guarantee is asked for."""
    from scipy.stats import binom

    return float(binom.cdf(k, n, p))


GUARANTEE_GRID = tuple(round(1.0 - i * 0.005, 3) for i in range(201))  # 1.0, 0.995, ..., 0.0


def calibrate_with_guarantee(scores, correct, max_drop: float, delta: float,
                             grid=GUARANTEE_GRID) -> tuple[np.ndarray, dict]:
    """Learn-then-Test thresholds (see the module docstring); NEVER everywhere if none passes."""
    n = scores.shape[1]
    final_right = correct[-1]
    samples = np.arange(n)
    chosen, tested = None, []
    for threshold in grid:
        thresholds = [threshold] * (scores.shape[0] - 1) + [0.0]
        exits = exits_taken(scores, thresholds)
        losses = int((final_right & ~correct[exits, samples]).sum())
        p_value = binomial_cdf(losses, n, max_drop)
        tested.append({"threshold": threshold, "losses": losses, "p_value": p_value})
        if p_value > delta:
            break
        chosen = threshold
    thresholds = np.array([NEVER if chosen is None else chosen] * (scores.shape[0] - 1) + [0.0])
    return thresholds, {"shared_threshold": chosen, "tested": len(tested), "n": n,
                        "last_test": tested[-1] if tested else None}
