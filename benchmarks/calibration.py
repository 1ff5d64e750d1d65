"""Exit thresholds from per-exit scores on held-out data (pure numpy, no I/O).

Arrays are indexed [exit, sample]: `scores` (confidence, higher = surer) and
`correct` (whether that exit's prediction is right). A sample leaves at the first
exit whose score reaches the exit's threshold; the last exit always answers.

- `select_margin`: the margin (in standard errors of the drop) a drop target needs on this
  model, chosen on the held-out split alone: the smallest on a grid whose thresholds,
  calibrated on one half and measured on the other (both ways, over several random
  halvings), keep the out-of-fold drop within the target in at least `within` of those
  trials (default 0.8; `within=None`: the mean out-of-fold drop within the target). The
  cheapest of many feasible threshold sets tends to be one whose drop its calibration sample
  underestimates; how much depends on the model, so one fixed margin does not fit every
  cascade. Keeping the mean within the target leaves the drop on new data above it about
  half the time (45% of the trials on the served cascade at the margin that rule chose), so
  the default asks for the target to hold in four trials out of five.
- `calibrate_accuracy_drop`: lowest mean MACs with held-out accuracy at most
  `max_drop` below the final exit's (`measure="net"`), or with at most `max_drop` of the
  samples the final exit gets right answered wrongly (`measure="lost"`: answers an early
  exit gets right where the final exit does not earn nothing, so the choice does not lean on
  an early exit that beats the final one on the held-out split by chance; the net drop is at
  most the lost share on any data).
- `calibrate_compute_budget`: best held-out accuracy with mean MACs within a budget.
  Both pick from one accuracy/MACs Pareto frontier over per-exit thresholds on a
  fine grid of score quantiles (`threshold_frontier`: a greedy trade-off path, then
  coordinate ascent on accuracy - lambda * MACs for many lambdas). The frontier does
  not depend on the target, so a looser target never costs more MACs.
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

import hashlib
from dataclasses import dataclass

import numpy as np

NEVER = 2.0  # a threshold no score reaches (scores lie in [0, 1])
DROP_MEASURES = ("net", "lost")


def drop_correctness(correct: np.ndarray, measure: str = "net") -> np.ndarray:
    """The per-exit correctness a drop target is measured on (see the module docstring).

    `net`: the exits' own. `lost`: a sample the final exit gets wrong counts as right at every
    exit, so final accuracy - cascade accuracy becomes the share of samples the final exit gets
    right and the cascade wrong.
    """
    if measure not in DROP_MEASURES:
        raise ValueError(f"drop measure {measure!r}: one of {', '.join(DROP_MEASURES)}")
    correct = np.asarray(correct, bool)
    return correct if measure == "net" else correct | ~correct[-1]


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


def _first_stop(stops: np.ndarray, rows: slice, default: int) -> np.ndarray:
    """Index of the first True row of stops[rows] per sample (offset to absolute), else `default`."""
    block = stops[rows]
    if block.shape[0] == 0:
        return np.full(stops.shape[1], default)
    hit = block.any(axis=0)
    return np.where(hit, block.argmax(axis=0) + (rows.start or 0), default)


def _coordinate_outcomes(scores, correct, macs, thresholds, exit_index: int, grid: np.ndarray):
    """(accuracy, mean MACs) for every value of `grid` at one exit, the others fixed.

    A sample that an earlier exit already stops is unaffected; of the others, those scoring at
    least the value stop here instead of at their first later stop. One sort and a cumulative
    sum give every grid value at once.
    """
    n = scores.shape[1]
    stops = scores >= np.asarray(thresholds, np.float64)[:, None]
    stops[-1] = True
    before = _first_stop(stops, slice(0, exit_index), -1)
    after = _first_stop(stops, slice(exit_index + 1, scores.shape[0]), scores.shape[0] - 1)
    samples = np.arange(n)
    decided = before >= 0
    otherwise = np.where(decided, before, after)  # the exit each sample takes if it does not stop here
    base_right = correct[otherwise, samples].sum()
    base_macs = macs[otherwise].sum()
    open_samples = samples[~decided]
    order = np.argsort(-scores[exit_index, open_samples], kind="stable")
    ranked = open_samples[order]
    gain_right = np.concatenate([[0], np.cumsum(correct[exit_index, ranked].astype(np.int64)
                                                - correct[after[ranked], ranked])])
    gain_macs = np.concatenate([[0.0], np.cumsum(macs[exit_index] - macs[after[ranked]])])
    # How many open samples score >= each grid value (scores sorted descending).
    count = np.searchsorted(-scores[exit_index, ranked], -np.asarray(grid, np.float64), side="right")
    return (base_right + gain_right[count]) / n, (base_macs + gain_macs[count]) / n


def _pareto(pool: dict[tuple, tuple[float, float]]) -> list[tuple]:
    """Keys of the non-dominated (accuracy, MACs) points of the pool, cheapest first."""
    keys = list(pool)
    values = np.array([pool[key] for key in keys])
    order = np.lexsort((-values[:, 0], values[:, 1]))  # by MACs, then the most accurate first
    front, best = [], -1.0
    for index in order:
        if values[index, 0] > best + 1e-12:
            front.append(keys[index])
            best = values[index, 0]
    return front


def threshold_frontier(scores, correct, macs, candidates: int = 200, trade_offs: int = 40,
                       rounds: int = 4, refinements: int = 3) -> list[tuple[np.ndarray, Outcome]]:
    """The accuracy/MACs Pareto frontier of per-exit thresholds on a fine grid (cheapest first).

    The pool of points: the greedy trade-off path; coordinate ascent on accuracy - lambda * MACs
    from the path's best point for each of `trade_offs` values of lambda; then, `refinements`
    times, every single-exit change of every frontier point (which reaches the non-convex parts
    of the frontier that no lambda does). Each coordinate is scanned over its whole grid in one
    vectorised pass and every point scanned joins the pool. The pool does not depend on any
    target, so choosing from its frontier is monotone: a looser target never costs more MACs.
    """
    macs = np.asarray(macs, np.float64)
    grids = _candidates(scores, candidates)
    pool: dict[tuple, tuple[float, float]] = {}

    def scan(thresholds: np.ndarray, exit_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = np.append(grids[exit_index], thresholds[exit_index])  # the current value last
        right, cost = _coordinate_outcomes(scores, correct, macs, thresholds, exit_index, values)
        order = np.lexsort((-right, cost))
        kept = order[right[order] > np.maximum.accumulate(np.concatenate([[-1.0], right[order][:-1]])) + 1e-12]
        for index in kept:  # only the scan's own non-dominated points can be on the frontier
            trial = thresholds.copy()
            trial[exit_index] = values[index]
            pool[tuple(trial)] = (float(right[index]), float(cost[index]))
        return values, right, cost

    path = trade_off_path(scores, correct, macs, grids)
    for position, outcome in path:
        pool[tuple(_thresholds(grids, position))] = (outcome.accuracy, outcome.mean_macs)
    points = np.array([[outcome.accuracy, outcome.mean_macs] for _, outcome in path])
    scale = max(1e-9, np.ptp(points[:, 0])) / max(1e-9, np.ptp(points[:, 1]))
    for lam in np.geomspace(0.02, 50, trade_offs) * scale:
        position, _ = max(path, key=lambda item: item[1].accuracy - lam * item[1].mean_macs)
        thresholds = _thresholds(grids, position)
        for _ in range(rounds):
            changed = False
            for exit_index in range(len(grids)):
                values, right, cost = scan(thresholds, exit_index)
                objective = right - lam * cost
                best = int(objective.argmax())
                if objective[best] > objective[-1] + 1e-12:
                    thresholds = thresholds.copy()
                    thresholds[exit_index] = values[best]
                    changed = True
            if not changed:
                break
    front, scanned = _pareto(pool), set()
    for _ in range(refinements):
        for key in set(front) - scanned:
            for exit_index in range(len(grids)):
                scan(np.array(key), exit_index)
            scanned.add(key)
        refined = _pareto(pool)
        if set(refined) <= scanned:
            break
        front = refined
    front = _pareto(pool)
    return [(np.array(key), evaluate(scores, correct, macs, key)) for key in front]


def pick_accuracy_drop(frontier, correct: np.ndarray, max_drop: float, margin: float = 0.0) -> np.ndarray:
    """The cheapest frontier point whose accuracy drop against the final exit is at most `max_drop`
    (the most accurate point if none is).

    With `margin` > 0 the drop must hold `margin` standard errors above its estimate (the standard
    error of the mean per-sample difference, final exit right minus cascade right): picking the
    cheapest of many feasible points favours those whose drop the held-out sample underestimates,
    and the margin pays for that. The bound of each point does not depend on the target, so the
    choice stays monotone.
    """
    final = correct[-1].astype(np.float64)
    samples = np.arange(correct.shape[1])
    for thresholds, outcome in frontier:
        drop, standard_error = _drop_and_error(final - correct[outcome.exits, samples])
        if drop + margin * standard_error <= max_drop + 1e-12:
            return thresholds
    return frontier[-1][0]


def _drop_and_error(difference: np.ndarray) -> tuple[float, float]:
    """The mean per-sample difference (final exit right minus cascade right) and its standard error."""
    error = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else 0.0
    return float(difference.mean()), float(error)


def _content_key(*arrays) -> str:
    """A digest of the arrays' shapes and bytes (caches below key on content, not identity)."""
    digest = hashlib.sha1()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def pick_compute_budget(frontier, max_mean_macs: float) -> np.ndarray:
    """The most accurate frontier point within the budget (the cheapest if none is)."""
    within = [thresholds for thresholds, outcome in frontier if outcome.mean_macs <= max_mean_macs + 1e-9]
    return within[-1] if within else frontier[0][0]


_FRONTIERS: dict[tuple, list] = {}  # a few recent frontiers: a sweep asks one held-out set many targets


def cached_frontier(scores, correct, macs, candidates: int = 200) -> list[tuple[np.ndarray, Outcome]]:
    """`threshold_frontier`, remembered for the same arrays (by content)."""
    key = (_content_key(np.asarray(scores, np.float64), np.asarray(correct, bool), np.asarray(macs, np.float64)),
           candidates)
    if key not in _FRONTIERS:
        if len(_FRONTIERS) >= 8:
            _FRONTIERS.pop(next(iter(_FRONTIERS)))
        _FRONTIERS[key] = threshold_frontier(scores, correct, macs, candidates)
    return _FRONTIERS[key]


def calibrate_accuracy_drop(scores, correct, macs, max_drop: float, candidates: int = 200,
                            margin: float = 0.0, measure: str = "net") -> np.ndarray:
    """Thresholds that save the most MACs with a drop of at most max_drop against the final exit,
    measured as `measure` says (`drop_correctness`; see `pick_accuracy_drop` for the margin)."""
    correct = drop_correctness(correct, measure)
    return pick_accuracy_drop(cached_frontier(scores, correct, macs, candidates), correct, max_drop, margin)


MARGIN_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


@dataclass(frozen=True)
class FoldCurve:
    """One calibration half's frontier, cheapest first, and what each point does on the other half."""

    fit_drop: np.ndarray  # the drop on the calibration half
    fit_se: np.ndarray  # its standard error there
    drop: np.ndarray  # the (net) drop on the other half
    macs: np.ndarray  # mean MACs on the other half


_FOLDS: dict[tuple, list[FoldCurve]] = {}


def fold_curves(scores, correct, macs, repeats: int = 10, seed: int = 0, measure: str = "net",
                candidates: int = 200, refit=None) -> list[FoldCurve]:
    """2 x `repeats` folds of the samples (random halvings, seeds seed, seed + 1, ...), remembered by content.
    `refit(fit_indices) -> (scores, correct)`, when given, recomputes every sample's scores and correctness
    with whatever was fitted on the data (exit ensembles' weights) fitted on the calibration half only, so
    that the other half measures it out of fold too."""
    scores, correct, macs = np.asarray(scores, np.float64), np.asarray(correct, bool), np.asarray(macs, np.float64)
    key = (_content_key(scores, correct, macs), repeats, seed, measure, candidates, refit is not None)
    if key in _FOLDS:
        return _FOLDS[key]
    n, curves = scores.shape[1], []
    everything = scores, correct
    for repeat in range(repeats):
        order = np.random.default_rng(seed + repeat).permutation(n)
        halves = (order[: n // 2], order[n // 2:])
        for fit, other in (halves, halves[::-1]):
            scores, correct = everything if refit is None else (np.asarray(array) for array in refit(fit))
            target = drop_correctness(correct, measure)
            frontier = threshold_frontier(scores[:, fit], target[:, fit], macs, candidates)
            fit_final, other_final = target[-1, fit].astype(np.float64), correct[-1, other].mean()
            fit_drop, fit_se, drop, spent = [], [], [], []
            for thresholds, outcome in frontier:
                mean, error = _drop_and_error(fit_final - target[outcome.exits, fit])
                fit_drop.append(mean)
                fit_se.append(error)
                measured = exits_taken(scores[:, other], thresholds)
                drop.append(other_final - correct[measured, other].mean())
                spent.append(macs[measured].mean())
            curves.append(FoldCurve(*(np.array(values) for values in (fit_drop, fit_se, drop, spent))))
    if len(_FOLDS) >= 4:
        _FOLDS.pop(next(iter(_FOLDS)))
    _FOLDS[key] = curves
    return curves


def out_of_fold_trials(curves: list[FoldCurve], max_drop: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per trial, the drop and mean MACs on the other half when the calibration half picks as
    `pick_accuracy_drop` does."""
    drops, spent = [], []
    for curve in curves:
        feasible = np.flatnonzero(curve.fit_drop + margin * curve.fit_se <= max_drop + 1e-12)
        index = int(feasible[0]) if len(feasible) else len(curve.drop) - 1
        drops.append(curve.drop[index])
        spent.append(curve.macs[index])
    return np.asarray(drops), np.asarray(spent)


def out_of_fold(curves: list[FoldCurve], max_drop: float, margin: float) -> tuple[float, float, float]:
    """Mean drop, mean MACs and the share of trials whose drop is at most `max_drop` (`out_of_fold_trials`)."""
    drops, spent = out_of_fold_trials(curves, max_drop, margin)
    return float(drops.mean()), float(spent.mean()), float(np.mean(drops <= max_drop + 1e-12))


OUT_OF_FOLD_WITHIN = 0.8  # select_margin's default: the target holds in four out-of-fold trials out of five


def holds_out_of_fold(trial: dict, max_drop: float, within: float | None = OUT_OF_FOLD_WITHIN) -> bool:
    """Whether a margin `select_margin` tried keeps the target by its rule: in at least `within` of the
    out-of-fold trials, or on their mean (`within` None)."""
    if within is None:
        return trial["out_of_fold_drop"] <= max_drop + 1e-12
    return trial["out_of_fold_within"] >= within - 1e-12


def select_margin(scores, correct, macs, max_drop: float, margins=MARGIN_GRID, repeats: int = 10,
                  measure: str = "net", refit=None,
                  within: float | None = OUT_OF_FOLD_WITHIN) -> tuple[float, list[dict]]:
    """The smallest margin that keeps the out-of-fold drop within `max_drop` in at least `within` of the
    trials (or on their mean, `within` None; the largest margin if none does), and every margin tried
    with its out-of-fold drop, MACs and share within (see the module docstring; `refit`: `fold_curves`)."""
    curves = fold_curves(scores, correct, macs, repeats, measure=measure, refit=refit)
    tried = []
    for margin in margins:
        drop, spent, share = out_of_fold(curves, max_drop, margin)
        tried.append({"margin": float(margin), "out_of_fold_drop": drop, "out_of_fold_macs": spent,
                      "out_of_fold_within": share})
        if holds_out_of_fold(tried[-1], max_drop, within):
            return float(margin), tried
    return float(margins[-1]), tried


def calibrate_compute_budget(scores, correct, macs, max_mean_macs: float, candidates: int = 200) -> np.ndarray:
    """Thresholds with the best accuracy whose mean MACs stay within the budget (the cheapest if none do)."""
    return pick_compute_budget(cached_frontier(scores, correct, macs, candidates), max_mean_macs)


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
