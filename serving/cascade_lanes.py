"""The cascade's lanes and their cost model: a `Lane` (one queue: a segment, or one exit's per-exit
model), `LaneCost` (a lane's batch time as a line fitted to its recent batches) and `_Backlog` (what
waits for the backend slots at one moment, by order key: the budget estimate's input)."""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.cascade import Cascade


class LaneCost:
    """A lane's batch time as a line, fixed + per sample (ms): a weighted least-squares fit through the
    (batch size, backend ms) of its recent batches (exponentially weighted sums), so the estimate of a
    batch of any size follows what the backend does now. Until batches of different sizes were seen,
    the per-sample cost is the mean time per sample (no fixed part: an over-estimate for large batches)."""

    __slots__ = ("alpha", "weight", "size", "ms", "size2", "size_ms")

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.weight = self.size = self.ms = self.size2 = self.size_ms = 0.0

    @property
    def known(self) -> bool:
        return self.weight > 0

    def observe(self, size: int, milliseconds: float) -> None:
        keep = 1 - self.alpha if self.weight else 0.0
        new = 1 - keep
        self.weight = 1.0
        self.size = keep * self.size + new * size
        self.ms = keep * self.ms + new * milliseconds
        self.size2 = keep * self.size2 + new * size * size
        self.size_ms = keep * self.size_ms + new * size * milliseconds

    def line(self) -> tuple[float, float]:
        """(fixed ms, ms per sample) of a batch."""
        variance = self.size2 - self.size * self.size
        if variance > 1e-9 * max(self.size2, 1.0):
            per_sample = (self.size_ms - self.size * self.ms) / variance
            fixed = self.ms - per_sample * self.size
            if per_sample > 0 and fixed >= 0:
                return fixed, per_sample
        return 0.0, self.ms / max(self.size, 1e-9)

    def batch_ms(self, size: int) -> float:
        fixed, per_sample = self.line()
        return fixed + per_sample * size if size > 0 else 0.0

    def work_ms(self, samples: int, max_batch: int) -> float:
        """Backend time of `samples` run in full batches of `max_batch` (the last one partial)."""
        if samples <= 0:
            return 0.0
        fixed, per_sample = self.line()
        return math.ceil(samples / max_batch) * fixed + per_sample * samples


class _Backlog:
    """What waits for the backend slots at one moment, by order key (the budget estimate's input):
    per lane, the live samples queued (sorted by key) and the samples running."""

    def __init__(self, cascade: Cascade) -> None:
        self.keys: dict[Lane, list[float]] = {}
        self.cumulative: dict[Lane, list[int]] = {}
        for lane in cascade.lanes:
            entries = sorted((key, len(group.samples)) for key, _, group in
                             itertools.chain(cascade.queues[lane], cascade.optional_queues.get(lane, ()))
                             if group.live)
            self.keys[lane] = [key for key, _ in entries]
            self.cumulative[lane] = list(itertools.accumulate(count for _, count in entries))
        self.running = {lane: cascade.in_lane[lane] - cascade.queued[lane] for lane in cascade.lanes}

    def before(self, lane: Lane, key: float) -> int:
        """Live samples queued in `lane` whose order key is before `key`."""
        position = bisect_left(self.keys[lane], key)
        return self.cumulative[lane][position - 1] if position else 0

    def queued(self, lane: Lane) -> int:
        return self.cumulative[lane][-1] if self.cumulative[lane] else 0


@dataclass(frozen=True, eq=False)
class Lane:
    """One queue of the cascade: the segment that ends at exit `position` of the plan,
    or (direct) that exit's per-exit model, which runs the whole prefix on the images
    in one call. The cascade makes each lane once, so lanes compare and hash by
    identity (a cheap dictionary key on the hot path)."""

    position: int  # of the exit in the plan
    direct: bool = False

