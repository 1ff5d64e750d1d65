"""The cascade's records: a request inside the cascade (`_Request`: its samples' answers so far, its
deadline and order key), a group of its samples waiting at or running in one lane (`_Group`), a batch's
confidence scores computed once per score kind (`_BatchScores`), and what `Cascade.infer` returns
(`CascadeResult`); plus the order keys' constants."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from serving.policy import RequestOptions, confidence_scores, softmax

if TYPE_CHECKING:
    from serving.cascade_lanes import Lane

NO_DEADLINE_ORDER_S = 3600.0  # ordering key of a request without a deadline: its arrival plus this
# Added to the ordering key of a budget request's deeper stages: optional work (the request has an answer
# from the exit it passed) goes after every request's mandatory work, whatever their deadlines.
OPTIONAL_ORDER_S = 2 * NO_DEADLINE_ORDER_S


@dataclass(frozen=True)
class CascadeResult:
    logits: np.ndarray  # (N, classes) of the exit each sample left at
    exit_index: np.ndarray  # (N,) position of that exit in the plan
    confidence: np.ndarray  # (N,) the request's score at that exit


@dataclass(slots=True, eq=False)
class _Request:
    options: RequestOptions
    size: int
    started: float
    future: asyncio.Future
    deadline: float  # time.monotonic() after which it is answered DeadlineExceeded (inf: none)
    key: float  # its order in every queue: earliest first
    remaining: int = 0
    # (samples, logits, exit position, confidence) of the samples answered so far, per batch.
    parts: list = field(default_factory=list)
    waiting: list = field(default_factory=list)  # its groups queued (not running) in some lane
    timer: asyncio.TimerHandle | None = None
    images: np.ndarray | None = None  # its normalised inputs: what a stage that takes the image gets again
    reserve_ms: float = 0.0  # (budget policy) what it keeps of its budget for what the cascade does not see

    def __post_init__(self) -> None:
        self.remaining = self.size

    def answer(self, samples: np.ndarray, logits: np.ndarray, index: int, confidence: np.ndarray) -> None:
        self.parts.append((samples, logits, index, confidence))
        self.remaining -= len(samples)
        if self.remaining == 0:
            self.future.set_result(None)

    def result(self) -> CascadeResult:
        if len(self.parts) == 1:  # every sample in one batch: its rows, in order
            _, logits, index, confidence = self.parts[0]
            exit_index = np.empty(self.size, dtype=np.int32)
            exit_index.fill(index)
            return CascadeResult(logits, exit_index, confidence.astype(np.float32, copy=False))
        logits = np.zeros((self.size, self.parts[0][1].shape[1]), dtype=np.float32)
        exit_index = np.zeros(self.size, dtype=np.int32)
        confidences = np.zeros(self.size, dtype=np.float32)
        for samples, rows, index, confidence in self.parts:
            logits[samples] = rows
            exit_index[samples] = index
            confidences[samples] = confidence
        return CascadeResult(logits, exit_index, confidences)


@dataclass(slots=True, eq=False)
class _Group:
    """Samples of one request waiting at (or running in) one lane."""

    request: _Request
    samples: np.ndarray  # indices into the request
    inputs: np.ndarray | None  # None once dropped (its memory goes at once)
    lane: Lane | None = None
    live: bool = True  # False once taken into a batch or dropped: the queue skips it
    # Budget policy: (exit position, logits, scores) of the exit its samples passed, what they answer
    # with if the next stage cannot start in time (at `give_up_at`, a time.monotonic(); its timer).
    fallback: tuple | None = None
    budget_end: float = math.inf  # its request's start + budget less its reserve (time.monotonic())
    give_up_at: float = math.inf
    give_up: asyncio.TimerHandle | None = None  # while it waits: `_give_up`; while its batch runs: `_abandon`
    abandoned: bool = False  # answered from its fallback while its batch ran: the batch's rows are ignored
    # Exit ensembles: (exits passed, samples, classes) log-probabilities of the exits its samples passed.
    history: np.ndarray | None = None


class _BatchScores:
    """Confidence scores of a batch's rows, computed once per score kind when first needed."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.probabilities: np.ndarray | None = None
        self.by_score: dict[str, np.ndarray] = {}

    def __call__(self, score: str) -> np.ndarray:
        scores = self.by_score.get(score)
        if scores is None:
            if self.probabilities is None:
                self.probabilities = softmax(self.logits.astype(np.float32, copy=False))
            scores = self.by_score[score] = confidence_scores(self.probabilities, score)
        return scores

