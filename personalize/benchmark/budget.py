"""A benchmark run's time limit (`personalize bench --time-limit`): how much of the run may go to setting
methods up, and how many interleaved rounds still fit, so a run on a lent machine ends on time with
every measured method timed in the same rounds.

Set-up (attach, save, warm-up) is the unpredictable part (a cold attach computes decompositions), so
no method after the floor and LoRA starts its set-up once `SET_UP_SHARE` of the limit is spent: those
are left out and listed. Rounds are then counted from the time the finished ones took: another
training round starts only when it and the inference rounds that would follow it still fit
(an inference round is taken to cost `INFERENCE_PER_TRAIN` training rounds, more than measured on CPU:
two base and two merged forwards plus a merge against a forward and a backward).
"""

from __future__ import annotations

import math
import time

SET_UP_SHARE = 0.6  # of the limit: methods past it are not set up (the floor and LoRA always are)
INFERENCE_PER_TRAIN = 1.5  # an inference round's time in training rounds, for planning only
ALWAYS = 2  # the floor and the LoRA reference are set up whatever the time


class TimeLimit:
    """`limit` seconds from `started` (a `time.perf_counter()` reading); `None` never runs out."""

    def __init__(self, limit: float | None, started: float) -> None:
        self.limit = limit
        self.started = started

    def left(self) -> float:
        return math.inf if self.limit is None else self.started + self.limit - time.perf_counter()

    def may_set_up(self, index: int) -> bool:
        """Whether the `index`-th method (0 = the floor, 1 = LoRA) may still be set up."""
        if index < ALWAYS or self.limit is None:
            return True
        return time.perf_counter() - self.started < SET_UP_SHARE * self.limit

    def another_training_round(self, done: int, seconds: float) -> bool:
        """Whether a training round after `done` ones (which took `seconds` in all) fits, with the
        `done + 1` inference rounds after it. The first round always runs."""
        if done == 0:
            return True
        per_round = seconds / done
        return self.left() >= per_round * (1 + (done + 1) * INFERENCE_PER_TRAIN)

    def another_inference_round(self, done: int, seconds: float) -> bool:
        """Whether an inference round after `done` ones (which took `seconds` in all) fits. The first always runs."""
        return done == 0 or self.left() >= seconds / done
