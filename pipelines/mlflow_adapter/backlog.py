"""What waits for the MLflow store: metric points and the other calls, kept while the store is down or while points
wait for their interval, and sent oldest first when it answers.

    backlog = Backlog(max_points=10_000, max_calls=1_000)
    backlog.add_points([Metric("loss", 2.3, timestamp, step)])
    backlog.add_call("log text samples/x.txt", lambda: client.log_text(...))
    backlog.send(try_call, send_points)    # False: the store stopped answering; the rest stays

Both are bounded: a long outage keeps the newest points and calls, and counts the points it let go.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request (mlflow/utils/validation.py)

TryCall = Callable[[str, Callable[[], None]], bool]  # (what, fn) -> True when done or refused for good


@dataclass
class Call:
    """A non-metric call, replayed in order once the store answers."""

    what: str
    fn: Callable[[], None]


class Backlog:
    def __init__(self, max_points: int, max_calls: int) -> None:
        self.points: collections.deque[Any] = collections.deque(maxlen=max_points)  # mlflow.entities.Metric
        self.calls: collections.deque[Call] = collections.deque(maxlen=max_calls)
        self.dropped_points = 0  # let go since the last outage ended

    def __bool__(self) -> bool:
        return bool(self.points or self.calls)

    def add_points(self, points: Iterable[Any]) -> None:
        for point in points:
            if len(self.points) == self.points.maxlen:
                self.dropped_points += 1
            self.points.append(point)

    def add_call(self, what: str, fn: Callable[[], None]) -> None:
        if len(self.calls) == self.calls.maxlen:
            log.warning("MLflow call queue is full: dropping %s", self.calls[0].what)
        self.calls.append(Call(what, fn))

    def clear(self) -> None:
        self.points.clear()
        self.calls.clear()

    def send(self, try_call: TryCall, send_points: Callable[[list[Any]], None]) -> bool:
        """The calls in order, then the points in batches of at most MAX_METRICS_PER_BATCH, each through
        `try_call`; True when nothing is left, False when the store stopped answering (the rest stays)."""
        while self.calls:
            if not try_call(self.calls[0].what, self.calls[0].fn):
                return False
            self.calls.popleft()
        while self.points:
            batch = [self.points[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self.points)))]
            if not try_call("log metrics", lambda b=batch: send_points(b)):
                return False
            for _ in batch:
                self.points.popleft()
        return True
