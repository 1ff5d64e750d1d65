"""Exit policies: pure functions from what a stage produced to "stop here" per sample.

No I/O and no clocks: the cascade passes in the scores, the elapsed time and the
predicted cost of the next stage, so every decision can be tested in isolation.

- confidence: stop at the first exit whose score reaches that exit's threshold;
- budget: stop when confident, or when the next stage could not finish within the
  request's latency budget (never continue past that point);
- fixed: stop at one exit depth; full: run to the final exit.

Exit ensembles (issue 20): a manifest may give exit k weights over the log-probabilities of exits
0..k (`ExitEntry.ensemble`, fitted on held-out by `benchmarks.calibrate`); the cascade then answers
and scores exit k with their weighted sum (`ensemble_step`), carrying each continuing sample's
earlier log-probabilities between stages. A per-exit model called directly (policies `fixed` and
`full` where the backend has them) answers with that exit's own logits.

This file is the one implementation of the policies, used in two places: the
gateway imports it, and the repository writer copies it verbatim beside the
`<model>_cascade` Triton Python-backend model (export/triton_cascade_model.py),
which imports it from there. So it imports nothing but the standard library and
numpy, and raises its own `PolicyError`, which the gateway maps to its error
hierarchy (serving.errors.InvalidParameter). tests/test_architecture.py checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POLICIES = ("confidence", "budget", "fixed", "full")
SCORES = ("max_prob", "margin", "entropy")
# Request parameters (KServe v2 `parameters`) that carry policy options.
POLICY_PARAMETERS = ("policy", "score", "threshold", "budget_ms", "exit_depth")


class PolicyError(ValueError):
    """Options that make no sense for the deployed exits (the gateway answers 422 / INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class RequestOptions:
    policy: str = "confidence"
    score: str = "max_prob"
    thresholds: tuple[float, ...] | None = None  # one per exit; None = the manifest's
    budget_ms: float | None = None
    exit_depth: int | None = None


@dataclass(frozen=True)
class ExitPlan:
    """What the policies know about the deployed exits."""

    depths: tuple[int, ...]
    thresholds: tuple[float, ...]  # calibrated (or default) threshold per exit
    # Per exit, weights over the log-probabilities of exits 0..k (None: every exit answers alone).
    ensembles: tuple[np.ndarray, ...] | None = None


def exit_plan(manifest, default_threshold: float = 0.9) -> ExitPlan:
    """The plan of a `common.manifest.Manifest`: calibrated thresholds, else the default."""
    thresholds = tuple(default_threshold if e.threshold is None else e.threshold for e in manifest.exits)
    ensembles = None
    if any(getattr(e, "ensemble", None) is not None for e in manifest.exits):
        ensembles = tuple(np.asarray(e.ensemble, np.float32) for e in manifest.exits)
    return ExitPlan(tuple(manifest.exit_depths), thresholds, ensembles)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ensemble_step(weights: np.ndarray, logits: np.ndarray,
                  history: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exit k's answer as an ensemble: (weights . [history, log_softmax(logits)], the history with this
    exit's log-probabilities added). `weights` has k + 1 entries; `history` (k, N, classes) holds the
    samples' log-probabilities at exits 0..k-1 (None or empty at the first exit). float32 throughout."""
    log_probs = log_softmax(logits.astype(np.float32, copy=False))[None]
    history = log_probs if history is None or not len(history) else np.concatenate([history, log_probs])
    if len(weights) != len(history):
        raise ValueError(f"{len(weights)} ensemble weights for {len(history)} exits' log-probabilities")
    combined = np.tensordot(weights.astype(np.float32, copy=False), history, axes=1)
    return combined.astype(np.float32, copy=False), history


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confidence_scores(probabilities: np.ndarray, score: str) -> np.ndarray:
    """Per-sample confidence in [0, 1]: higher means surer."""
    if score == "max_prob":
        return probabilities.max(axis=1)
    if score == "margin":
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if score == "entropy":  # 1 - normalised entropy: 1 for a one-hot, 0 for uniform
        p = np.clip(probabilities, 1e-12, 1.0)
        entropy = -(p * np.log(p)).sum(axis=1)
        return 1.0 - entropy / np.log(probabilities.shape[1])
    raise PolicyError(f"unknown score {score!r}; use one of {', '.join(SCORES)}")


def _number(name: str, value, kind=float):
    if isinstance(value, bool):
        raise PolicyError(f"parameter {name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PolicyError(f"parameter {name} must be a number, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise PolicyError(f"parameter {name} must be finite, got {value!r}")
    return number


def options_from_parameters(parameters: dict, default_policy: str = "confidence") -> RequestOptions:
    """Policy options from request parameters (strings accepted, as gRPC clients send them)."""
    threshold = parameters.get("threshold")
    thresholds = None
    if threshold is not None:
        values = threshold if isinstance(threshold, list) else str(threshold).split(",") \
            if isinstance(threshold, str) else [threshold]
        thresholds = tuple(_number("threshold", value) for value in values)
        if not thresholds:
            raise PolicyError("parameter threshold is empty")
    budget = parameters.get("budget_ms")
    depth = parameters.get("exit_depth")
    for name in ("policy", "score"):
        if name in parameters and not isinstance(parameters[name], str):
            raise PolicyError(f"parameter {name} must be a string")
    return RequestOptions(
        policy=parameters.get("policy", default_policy),
        score=parameters.get("score", "max_prob"),
        thresholds=thresholds,
        budget_ms=None if budget is None else _number("budget_ms", budget),
        exit_depth=None if depth is None else _number("exit_depth", depth, int),
    )


def resolve_options(options: RequestOptions, plan: ExitPlan) -> RequestOptions:
    """Check options against the deployed exits; fill thresholds from the plan."""
    if options.policy not in POLICIES:
        raise PolicyError(f"unknown policy {options.policy!r}; use one of {', '.join(POLICIES)}")
    if options.score not in SCORES:
        raise PolicyError(f"unknown score {options.score!r}; use one of {', '.join(SCORES)}")
    thresholds = options.thresholds
    if thresholds is None:
        thresholds = plan.thresholds
    elif len(thresholds) == 1:
        thresholds = thresholds * len(plan.depths)
    elif len(thresholds) != len(plan.depths):
        raise PolicyError(f"got {len(thresholds)} thresholds for {len(plan.depths)} exits "
                               f"(depths {', '.join(map(str, plan.depths))}); give one or one per exit")
    if any(not np.isfinite(t) for t in thresholds):
        raise PolicyError("thresholds must be finite numbers")
    if options.policy == "budget":
        if options.budget_ms is None:
            raise PolicyError("the budget policy needs budget_ms")
    if options.budget_ms is not None and not (np.isfinite(options.budget_ms) and options.budget_ms > 0):
        raise PolicyError(f"budget_ms must be a positive number, got {options.budget_ms}")
    if options.policy == "fixed":
        if options.exit_depth is None:
            raise PolicyError("the fixed policy needs exit_depth")
        if options.exit_depth not in plan.depths:
            raise PolicyError(f"no exit at depth {options.exit_depth}; available depths: "
                                   f"{', '.join(map(str, plan.depths))}")
    return RequestOptions(options.policy, options.score, tuple(float(t) for t in thresholds),
                          options.budget_ms, options.exit_depth)


def should_stop(
    stage: int,
    scores: np.ndarray,
    options: RequestOptions,
    plan: ExitPlan,
    elapsed_ms: float = 0.0,
    next_stage_ms: float | None = None,
) -> np.ndarray:
    """Boolean per sample: stop at exit `stage` (0-based) rather than continue.

    `options` must come from `resolve_options`. `elapsed_ms` is the time the
    request has spent so far and `next_stage_ms` the predicted time of the next
    stage (queueing included); both only matter to the budget policy.
    """
    count = len(scores)
    if stage >= len(plan.depths) - 1:
        return np.ones(count, dtype=bool)
    if options.policy == "full":
        return np.zeros(count, dtype=bool)
    if options.policy == "fixed":
        return np.full(count, plan.depths[stage] == options.exit_depth)
    confident = scores >= options.thresholds[stage]
    if options.policy == "confidence":
        return confident
    # budget: continuing is allowed only if the next stage can finish in time.
    out_of_time = next_stage_ms is None or elapsed_ms + next_stage_ms > options.budget_ms
    return confident | out_of_time
