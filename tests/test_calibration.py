import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.calibration import (
    NEVER,
    OUT_OF_FOLD_WITHIN,
    binomial_cdf,
    calibrate_accuracy_drop,
    calibrate_compute_budget,
    calibrate_with_guarantee,
    drop_correctness,
    evaluate,
    exits_taken,
    fold_curves,
    holds_out_of_fold,
    oracle,
    out_of_fold,
    pick_accuracy_drop,
    pick_compute_budget,
    select_margin,
    threshold_frontier,
    trade_off_path,
)

MACS = np.array([1.0, 2.0, 4.0])


def synthetic(n=4000, seed=0):
    """Exit k is right exactly when its score reaches 0.5 + 0.1k; the final exit is always right."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, size=(3, n))
    correct = np.stack([scores[0] >= 0.5, scores[1] >= 0.6, np.ones(n, bool)])
    return scores, correct


def test_exits_and_evaluation():
    scores = np.array([[0.9, 0.1, 0.1], [0.0, 0.8, 0.1], [0.0, 0.0, 0.0]])
    correct = np.array([[True, False, False], [False, True, False], [True, True, True]])
    assert exits_taken(scores, [0.5, 0.5, 0.0]).tolist() == [0, 1, 2]
    outcome = evaluate(scores, correct, MACS, [0.5, 0.5, 0.0])
    assert outcome.accuracy == 1.0 and outcome.mean_macs == pytest.approx(7 / 3)
    assert outcome.exit_share == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    best = oracle(np.array([[True, False, False], [True, True, False], [True, True, False]]), MACS)
    assert best.exits.tolist() == [0, 1, 2] and best.accuracy == pytest.approx(2 / 3)


def test_zero_drop_finds_the_thresholds_that_lose_nothing():
    scores, correct = synthetic()
    thresholds = calibrate_accuracy_drop(scores, correct, MACS, max_drop=0.0)
    outcome = evaluate(scores, correct, MACS, thresholds)
    assert outcome.accuracy == 1.0
    # The known answer: exit 0 from 0.5 and exit 1 from 0.6 (to the quantile grid's resolution).
    assert 0.5 <= thresholds[0] < 0.53 and 0.6 <= thresholds[1] < 0.63
    assert outcome.mean_macs < 0.6 * MACS[-1]


def test_larger_drop_allows_fewer_macs():
    scores, correct = synthetic()
    strict = evaluate(scores, correct, MACS, calibrate_accuracy_drop(scores, correct, MACS, 0.0))
    loose = evaluate(scores, correct, MACS, calibrate_accuracy_drop(scores, correct, MACS, 0.05))
    assert loose.accuracy >= 1.0 - 0.05 and loose.mean_macs < strict.mean_macs


def test_the_lost_measure_gives_no_credit_for_an_early_exit_beating_the_final_one():
    # Exit 0 is right exactly when its score reaches 0.5; the final exit is wrong on a tenth of the
    # samples, half of which exit 0 gets right: on net, exit 0 may take more than its own errors allow.
    rng = np.random.default_rng(1)
    n = 4000
    scores = np.stack([rng.uniform(0, 1, n), np.zeros(n)])
    early = scores[0] >= 0.5
    final = np.ones(n, bool)
    final[rng.choice(n, n // 10, replace=False)] = False
    correct = np.stack([early, final])
    macs = np.array([1.0, 4.0])
    lost = drop_correctness(correct, "lost")
    assert lost[:, ~final].all() and (lost[:, final] == correct[:, final]).all()
    assert (drop_correctness(correct, "net") == correct).all()
    with pytest.raises(ValueError, match="net, lost"):
        drop_correctness(correct, "gross")
    for target in (0.0, 0.02, 0.05):
        net = evaluate(scores, correct, macs, calibrate_accuracy_drop(scores, correct, macs, target))
        strict = evaluate(scores, correct, macs, calibrate_accuracy_drop(scores, correct, macs, target, measure="lost"))
        samples = np.arange(n)
        lost_share = (final & ~correct[strict.exits, samples]).mean()
        assert lost_share <= target + 1e-12  # the bound it promises, and the net drop is below it
        assert final.mean() - strict.accuracy <= lost_share + 1e-12
        assert net.mean_macs <= strict.mean_macs  # no credit taken, so never cheaper


def loosely_scored(n=3000, seed=0):
    """Exit 0's correctness depends on its score only loosely, so its held-out drop is noisy."""
    rng = np.random.default_rng(seed)
    scores = np.stack([rng.uniform(0, 1, n), rng.uniform(0, 1, n), np.zeros(n)])
    correct = np.stack([rng.uniform(0, 1, n) < 0.6 + 0.4 * scores[0], rng.uniform(0, 1, n) < 0.8 + 0.2 * scores[1],
                        rng.uniform(0, 1, n) < 0.95])
    return scores, correct


def test_the_margin_is_the_smallest_that_holds_the_target_out_of_fold():
    scores, correct = loosely_scored()
    margin, tried = select_margin(scores, correct, MACS, 0.01, repeats=4, within=None)  # the mean rule
    curves = fold_curves(scores, correct, MACS, repeats=4)
    assert len(curves) == 8 and all(len(c.drop) == len(c.fit_drop) == len(c.macs) for c in curves)
    assert [t["margin"] for t in tried][-1] == margin
    assert tried[-1]["out_of_fold_drop"] <= 0.01 + 1e-12 or margin == 4.0
    for earlier in tried[:-1]:  # every smaller margin let more through out of fold
        assert earlier["out_of_fold_drop"] > 0.01
    assert out_of_fold(curves, 0.01, margin) == (tried[-1]["out_of_fold_drop"], tried[-1]["out_of_fold_macs"],
                                                 tried[-1]["out_of_fold_within"])
    # A larger margin never costs fewer MACs out of fold.
    spent = [out_of_fold(curves, 0.01, m)[1] for m in (0.0, 1.0, 2.0, 4.0)]
    assert spent == sorted(spent)
    # Exits whose scores say exactly when they are right need no margin.
    exact_scores, exact_correct = synthetic()
    assert select_margin(exact_scores, exact_correct, MACS, 0.0, repeats=2)[0] == 0.0


def test_the_default_margin_holds_the_target_in_four_out_of_fold_trials_out_of_five():
    scores, correct = loosely_scored()
    curves = fold_curves(scores, correct, MACS, repeats=4)
    margin, tried = select_margin(scores, correct, MACS, 0.01, repeats=4)
    assert OUT_OF_FOLD_WITHIN == 0.8 and tried[-1]["margin"] == margin
    for trial in tried:  # the share is counted over the 8 trials, the same halves as the mean
        drops = []
        for curve in curves:
            feasible = np.flatnonzero(curve.fit_drop + trial["margin"] * curve.fit_se <= 0.01 + 1e-12)
            drops.append(curve.drop[int(feasible[0]) if len(feasible) else -1])
        assert trial["out_of_fold_within"] == pytest.approx(np.mean(np.array(drops) <= 0.01 + 1e-12))
    assert tried[-1]["out_of_fold_within"] >= 0.8 or margin == 4.0
    assert all(earlier["out_of_fold_within"] < 0.8 for earlier in tried[:-1])
    # Asking the target to hold in most trials never needs a smaller margin than holding it on the mean
    # here, and a stricter share never a smaller one than a looser share.
    mean_margin, _ = select_margin(scores, correct, MACS, 0.01, repeats=4, within=None)
    chosen = [select_margin(scores, correct, MACS, 0.01, repeats=4, within=w)[0] for w in (0.5, 0.8, 1.0)]
    assert chosen == sorted(chosen) and chosen[1] >= mean_margin
    assert holds_out_of_fold({"out_of_fold_drop": 0.02, "out_of_fold_within": 0.8}, 0.01)
    assert not holds_out_of_fold({"out_of_fold_drop": 0.02, "out_of_fold_within": 0.8}, 0.01, within=None)
    assert not holds_out_of_fold({"out_of_fold_drop": 0.0, "out_of_fold_within": 0.75}, 0.01)


def test_compute_budget_is_met_with_the_best_accuracy_available():
    scores, correct = synthetic()
    thresholds = calibrate_compute_budget(scores, correct, MACS, max_mean_macs=2.0)
    outcome = evaluate(scores, correct, MACS, thresholds)
    assert outcome.mean_macs <= 2.0
    # Sending only the confident half early costs 2.5 MACs; meeting 2.0 needs some mistakes, but few.
    assert outcome.accuracy > 0.8


def test_binomial_cdf_matches_the_exact_sum():
    from fractions import Fraction
    from math import comb

    for k, n, p in [(0, 10, Fraction(1, 10)), (5, 100, Fraction(1, 20)), (3, 40, Fraction(1, 4))]:
        exact = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, float(p)) == pytest.approx(float(exact), rel=1e-9)
    assert binomial_cdf(10, 10, 0.3) == 1.0 and binomial_cdf(0, 5, 0.0) == 1.0


def test_learn_then_test_controls_the_drop():
    scores, correct = synthetic(n=4000)
    thresholds, details = calibrate_with_guarantee(scores, correct, max_drop=0.1, delta=0.1)
    shared = details["shared_threshold"]
    # Losses at a shared threshold t < 0.5 are the exit-0 samples scoring in [t, 0.5): rate 0.5 - t,
    # so the test may go no lower than about 0.4, and a margin above it is the price of the guarantee.
    assert 0.4 <= shared <= 0.5 and thresholds[-1] == 0.0
    fresh_scores, fresh_correct = synthetic(n=20000, seed=1)
    drop = 1.0 - evaluate(fresh_scores, fresh_correct, MACS, thresholds).accuracy
    assert drop <= 0.1


def test_learn_then_test_with_an_impossible_target_never_exits_early():
    scores, correct = synthetic(n=500)
    correct[0] = ~correct[0]  # exit 0 is now wrong whenever confident
    thresholds, details = calibrate_with_guarantee(scores, correct, max_drop=0.0, delta=0.05)
    assert details["shared_threshold"] is None and list(thresholds[:-1]) == [NEVER, NEVER]


def noisy(n=5000, seed=0):
    """Five exits whose correctness only loosely follows their scores, as with a real network."""
    rng = np.random.default_rng(seed)
    skill = np.array([0.70, 0.80, 0.84, 0.86, 0.88])
    scores = rng.beta(2 + 6 * skill[:, None], 2, size=(5, n))
    correct = rng.uniform(size=(5, n)) < 0.25 + 0.75 * scores ** 2 * skill[:, None] / skill.max()
    return scores, correct, np.array([1.0, 1.7, 2.4, 3.1, 3.8])


def test_path_only_gets_cheaper_and_looser_targets_never_cost_more():
    scores, correct, macs = noisy()
    grids = [np.concatenate([[NEVER], np.linspace(1, 0, 21)]) for _ in range(4)]
    path = trade_off_path(scores, correct, macs, grids)
    costs = [outcome.mean_macs for _, outcome in path]
    assert costs[0] == macs[-1] and costs[-1] == macs[0] and all(a >= b for a, b in zip(costs, costs[1:]))
    drops = [0.0, 0.005, 0.01, 0.02, 0.05]
    spent = [evaluate(scores, correct, macs, calibrate_accuracy_drop(scores, correct, macs, d)).mean_macs
             for d in drops]
    assert all(a >= b - 1e-9 for a, b in zip(spent, spent[1:])), spent
    budgets = [3.5, 3.0, 2.5, 2.0]
    kept = [evaluate(scores, correct, macs, calibrate_compute_budget(scores, correct, macs, b)) for b in budgets]
    assert all(o.mean_macs <= b + 1e-9 for o, b in zip(kept, budgets))
    assert all(a.accuracy >= b.accuracy - 1e-9 for a, b in zip(kept, kept[1:])), [o.accuracy for o in kept]


def test_budget_uses_middle_exits_when_they_pay():
    scores, correct, macs = noisy()
    outcome = evaluate(scores, correct, macs, calibrate_compute_budget(scores, correct, macs, 2.4))
    assert outcome.mean_macs <= 2.4 and sum(outcome.exit_share[1:4]) > 0.05


def brute_force_cheapest(scores, correct, macs, grids, floor):
    """Exhaustive search over every pair of early-exit thresholds: the fewest MACs with accuracy >= floor."""
    best = None
    for first in grids[0]:
        for second in grids[1]:
            outcome = evaluate(scores, correct, macs, [first, second, 0.0])
            if outcome.accuracy >= floor - 1e-12 and (best is None or outcome.mean_macs < best - 1e-12):
                best = outcome.mean_macs
    return best


def three_exits(n=1500, seed=0):
    """Three exits right with a probability that grows with their score: no threshold is lossless."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, size=(3, n))
    correct = rng.uniform(0, 1, size=(3, n)) < np.array([[0.6], [0.75], [0.9]]) * (0.55 + 0.45 * scores)
    return scores, correct


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.03, 0.08])
def test_frontier_finds_the_exhaustive_optimum(drop):
    scores, correct = three_exits()
    candidates = 40
    frontier = threshold_frontier(scores, correct, MACS, candidates=candidates)
    chosen = evaluate(scores, correct, MACS, pick_accuracy_drop(frontier, correct, drop))
    grids = [np.concatenate([[NEVER], np.unique(np.quantile(row, np.linspace(1, 0, candidates)))])
             for row in scores[:2]]
    optimum = brute_force_cheapest(scores, correct, MACS, grids, correct[-1].mean() - drop)
    assert chosen.accuracy >= correct[-1].mean() - drop - 1e-12
    assert chosen.mean_macs <= optimum + 0.01 * MACS[-1]  # within one percent of the full cost


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_looser_targets_never_cost_more(seed):
    scores, correct = three_exits(n=600, seed=seed)
    frontier = threshold_frontier(scores, correct, MACS, candidates=30, trade_offs=10)
    costs = [evaluate(scores, correct, MACS, pick_accuracy_drop(frontier, correct, d)).mean_macs
             for d in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)]
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
    accuracies = [evaluate(scores, correct, MACS, pick_compute_budget(frontier, budget)).accuracy
                  for budget in (1.5, 2.0, 2.5, 3.0, 4.0)]
    assert all(b >= a - 1e-12 for a, b in zip(accuracies, accuracies[1:]))


def test_coordinate_scan_matches_evaluating_each_value():
    from benchmarks.calibration import _coordinate_outcomes

    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, (4, 3000))
    correct = rng.uniform(0, 1, (4, 3000)) < 0.7
    macs = np.array([1.0, 2.0, 3.0, 4.0])
    thresholds = np.array([0.9, 0.7, 0.8, 0.0])
    grid = np.array([NEVER, 0.95, 0.5, 0.3, 0.0, 0.7])
    for exit_index in range(3):
        right, cost = _coordinate_outcomes(scores, correct, macs, thresholds, exit_index, grid)
        for value, accuracy, mean_macs in zip(grid, right, cost):
            trial = thresholds.copy()
            trial[exit_index] = value
            outcome = evaluate(scores, correct, macs, trial)
            assert accuracy == pytest.approx(outcome.accuracy) and mean_macs == pytest.approx(outcome.mean_macs)


def test_a_margin_buys_safety_with_macs():
    scores, correct = three_exits(n=2000)
    frontier = threshold_frontier(scores, correct, MACS, candidates=40)
    plain = evaluate(scores, correct, MACS, pick_accuracy_drop(frontier, correct, 0.02))
    careful = evaluate(scores, correct, MACS, pick_accuracy_drop(frontier, correct, 0.02, margin=1.0))
    assert careful.accuracy >= plain.accuracy and careful.mean_macs >= plain.mean_macs
    difference = correct[-1].astype(float) - correct[careful.exits, np.arange(2000)]
    assert difference.mean() + difference.std(ddof=1) / np.sqrt(2000) <= 0.02 + 1e-12


def test_exit_ablation_writes_its_table(tiny_checkpoint, imagefolder, tmp_path):
    import json

    from tests.conftest import run_module

    out = tmp_path / "ablation"
    result = run_module("benchmarks.exit_ablation", str(tiny_checkpoint), "--modes", "plain,temperature,ensemble",
                        "--margins", "0,1", "--output", str(out), "--test")
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["mode"], row["margin"]) for row in rows] == [
        ("plain", 0.0), ("plain", 1.0), ("temperature", 0.0), ("temperature", 1.0), ("ensemble", 0.0),
        ("ensemble", 1.0)]
    for row in rows:
        assert 0 < row["test"]["macs_fraction"] <= 1.01 and len(row["test"]["exit_acc"]) == 3
    assert "| tiny | ensemble | net | 1 |" in out.with_suffix(".md").read_text()

    # Both drop measures, the 2-fold figures over three random halvings.
    result = run_module("benchmarks.exit_ablation", str(tiny_checkpoint), "--modes", "plain",
                        "--drop-measures", "net,lost", "--repeats", "3", "--max-drop", "5", "--output", str(out))
    assert result.returncode == 0, result.stderr
    net, lost = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (net["drop_measure"], lost["drop_measure"]) == ("net", "lost")
    assert net["heldout_2fold"]["drop_pt_sd"] >= 0  # six folds' spread
    for row in (net, lost):
        assert 0 < row["heldout_2fold"]["macs_fraction"] <= 1.01
    assert run_module("benchmarks.exit_ablation", str(tiny_checkpoint), "--drop-measures", "gross",
                      "--output", str(out)).returncode != 0


def test_exit_ablation_measures_a_composed_cascade(tiny_checkpoint, imagefolder, tmp_path):
    import json

    from common.checkpoint_meta import read_checkpoint_meta
    from tests.conftest import run_module

    out = tmp_path / "composed"
    composed = f"{tiny_checkpoint}:3,5+{tiny_checkpoint}:8"  # the tiny net's first two exits, then it again
    result = run_module("benchmarks.exit_ablation", str(tiny_checkpoint), composed, "--modes", "plain",
                        "--output", str(out))
    assert result.returncode == 0, result.stderr
    single, chained = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert chained["checkpoint"] == composed
    assert chained["heldout_exit_acc"] == single["heldout_exit_acc"]  # the same exits' logits, in order
    exits = read_checkpoint_meta(tiny_checkpoint).exits
    full = exits[2].standalone_macs  # the baseline: the last network's final exit alone
    # The second network starts from the image again: exit 8 costs what exits 3 and 5 cost, then the
    # network alone (its own skipped heads are not run).
    expected = [exits[0].macs / full, exits[1].macs / full, (exits[1].macs + full) / full]
    assert chained["exit_macs_fraction"] == pytest.approx(expected)
    assert 0 < chained["heldout_2fold"]["macs_fraction"] <= expected[-1] + 1e-9
    assert "| tiny:3,5 -> tiny:8 | plain | net | 0 |" in out.with_suffix(".md").read_text()
