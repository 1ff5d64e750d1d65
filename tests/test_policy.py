import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.policy import (
    ExitPlan,
    PolicyError,
    RequestOptions,
    confidence_scores,
    resolve_options,
    should_stop,
    softmax,
)

PLAN = ExitPlan(depths=(15, 25, 56), thresholds=(0.9, 0.8, 0.7))


def first_exit(options: RequestOptions, probabilities: list[np.ndarray], elapsed=None, next_ms=None) -> int:
    """Walk the stages for one sample as the cascade does; return the exit position."""
    options = resolve_options(options, PLAN)
    for stage, probs in enumerate(probabilities):
        scores = confidence_scores(probs[None, :], options.score)
        e = 0.0 if elapsed is None else elapsed[stage]
        n = None if next_ms is None or stage + 1 >= len(next_ms) else next_ms[stage + 1]
        if should_stop(stage, scores, options, PLAN, e, n)[0]:
            return stage
    raise AssertionError("the last stage must always stop")


probability_rows = st.lists(st.floats(0.01, 10.0), min_size=3, max_size=6).map(
    lambda values: np.asarray(values) / np.sum(values))
three_stages = st.tuples(probability_rows, probability_rows, probability_rows).filter(
    lambda rows: len({len(r) for r in rows}) == 1)


@settings(max_examples=200, deadline=None)
@given(three_stages, st.sampled_from(["max_prob", "margin", "entropy"]))
def test_threshold_zero_takes_the_first_exit_and_above_one_the_last(rows, score):
    assert first_exit(RequestOptions(score=score, thresholds=(0.0,)), list(rows)) == 0
    assert first_exit(RequestOptions(score=score, thresholds=(1.01,)), list(rows)) == 2


@settings(max_examples=200, deadline=None)
@given(three_stages, st.floats(0.1, 50.0), st.floats(0.1, 50.0),
       st.lists(st.floats(0.0, 20.0), min_size=3, max_size=3), st.lists(st.floats(0.0, 20.0), min_size=3, max_size=3))
def test_a_larger_budget_never_yields_a_shallower_exit(rows, budget, extra, elapsed, next_ms):
    elapsed = np.cumsum(elapsed).tolist()  # time only grows along the cascade
    small = first_exit(RequestOptions(policy="budget", budget_ms=budget), list(rows), elapsed, next_ms)
    large = first_exit(RequestOptions(policy="budget", budget_ms=budget + extra), list(rows), elapsed, next_ms)
    assert large >= small


def test_budget_stops_before_a_stage_that_cannot_finish_in_time():
    unsure = np.full(4, 0.25)
    options = resolve_options(RequestOptions(policy="budget", budget_ms=10.0, thresholds=(2.0,)), PLAN)
    scores = confidence_scores(unsure[None, :], "max_prob")
    assert not should_stop(0, scores, options, PLAN, elapsed_ms=3.0, next_stage_ms=6.0)[0]
    assert should_stop(0, scores, options, PLAN, elapsed_ms=5.0, next_stage_ms=6.0)[0]
    assert should_stop(0, scores, options, PLAN, elapsed_ms=0.0, next_stage_ms=None)[0]  # unknown cost
    confident = confidence_scores(np.array([[0.97, 0.01, 0.01, 0.01]]), "max_prob")
    calibrated = resolve_options(RequestOptions(policy="budget", budget_ms=100.0), PLAN)
    assert should_stop(0, confident, calibrated, PLAN, elapsed_ms=0.0, next_stage_ms=1.0)[0]


def test_decisions_are_per_sample():
    probs = softmax(np.array([[9.0, 0, 0], [0.1, 0, 0], [0, 8.0, 0]]))
    options = resolve_options(RequestOptions(), PLAN)
    stop = should_stop(0, confidence_scores(probs, "max_prob"), options, PLAN)
    assert stop.tolist() == [True, False, True]


def test_fixed_and_full():
    scores = np.array([1.0, 1.0])
    fixed = resolve_options(RequestOptions(policy="fixed", exit_depth=25), PLAN)
    assert should_stop(0, scores, fixed, PLAN).tolist() == [False, False]
    assert should_stop(1, scores, fixed, PLAN).tolist() == [True, True]
    full = resolve_options(RequestOptions(policy="full"), PLAN)
    assert not should_stop(1, scores, full, PLAN).any() and should_stop(2, scores, full, PLAN).all()


def test_scores():
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(confidence_scores(probs, "max_prob"), [0.7, 1 / 3])
    np.testing.assert_allclose(confidence_scores(probs, "margin"), [0.5, 0.0], atol=1e-12)
    entropy = confidence_scores(probs, "entropy")
    assert 0 < entropy[0] < 1 and abs(entropy[1]) < 1e-9
    assert confidence_scores(np.array([[1.0, 0.0, 0.0]]), "entropy")[0] == pytest.approx(1.0)


@pytest.mark.parametrize(("options", "message"), [
    (RequestOptions(policy="fastest"), "unknown policy"),
    (RequestOptions(score="vibes"), "unknown score"),
    (RequestOptions(thresholds=(0.1, 0.2)), "2 thresholds for 3 exits"),
    (RequestOptions(thresholds=(float("nan"),)), "finite"),
    (RequestOptions(policy="budget"), "needs budget_ms"),
    (RequestOptions(policy="budget", budget_ms=-1.0), "positive"),
    (RequestOptions(policy="fixed"), "needs exit_depth"),
    (RequestOptions(policy="fixed", exit_depth=20), "available depths: 15, 25, 56"),
])
def test_nonsensical_options_are_rejected(options, message):
    with pytest.raises(PolicyError, match=message):
        resolve_options(options, PLAN)


def test_manifest_thresholds_are_the_default_and_one_value_applies_to_all():
    assert resolve_options(RequestOptions(), PLAN).thresholds == (0.9, 0.8, 0.7)
    assert resolve_options(RequestOptions(thresholds=(0.5,)), PLAN).thresholds == (0.5, 0.5, 0.5)
