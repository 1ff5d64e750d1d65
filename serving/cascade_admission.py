"""Admission control and draining: the bound on the images inside the cascade
(`default_queue_images`), a request's refusal when it is reached (`overloaded`, with its Retry-After
from `retry_after_s`), mixed into `Cascade`, and the wait for refusals to quiet down after a drain
(`until_quiet`, shared with the Triton cascade)."""

from __future__ import annotations

import asyncio
import time

from serving.errors import Overloaded


def default_queue_images(per_image_ms: float | None, workers: int, queue_ms: float, minimum: int,
                         unprofiled: int = 4096) -> int:
    """The admission bound: `queue_ms` of work at `per_image_ms` (the full network's cost per image
    at the largest profiled batch) on `workers` slots, at least `minimum`; `unprofiled` without a profile."""
    if not per_image_ms or per_image_ms <= 0:
        return max(unprofiled, minimum)
    return max(minimum, int(queue_ms / per_image_ms * workers))


async def until_quiet(cascade, quiet_s: float = 0.2, at_most_s: float = 2.0) -> None:
    """After a drain: wait (bounded) until no new request has been refused for `quiet_s`. Clients
    still sending (gRPC calls queued behind the connection's stream limit, say) get their
    UNAVAILABLE answers before the front ends close, instead of a cancelled call."""
    end = time.monotonic() + at_most_s
    while time.monotonic() < end and time.monotonic() - cascade.last_refusal < quiet_s:
        await asyncio.sleep(quiet_s / 4)


class _Admission:
    """Mixed into `Cascade`: reads its `settings`, `slots`, `images_in` and `run_ms`."""

    def retry_after_s(self) -> float:
        """How long the images inside the cascade take to drain, roughly (for Retry-After)."""
        per_batch = [ms for lane, ms in self.run_ms.items() if ms and not lane.direct]
        batch_ms = sum(per_batch) if per_batch else 100.0
        batches = self.images_in / self.settings.max_batch_size
        return max(1.0, batches * batch_ms / 1000 / self.slots)

    def overloaded(self, size: int) -> Overloaded | None:
        """Admission control: the refusal of a request of `size` images now (None: it would be admitted).
        The front ends ask before decoding a request, so that a refusal costs no decode or copy."""
        bound = self.settings.max_queue_images
        if bound and self.images_in and self.images_in + size > bound:
            return Overloaded(f"the gateway is at capacity ({self.images_in} images in the cascade, limit "
                              f"{bound}); retry later", self.retry_after_s())
        return None
