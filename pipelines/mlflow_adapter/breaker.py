"""When to call an MLflow store that stopped answering: a circuit breaker, so that an outage costs the tracker one
failed call per retry interval instead of a timeout at every log line.

    breaker = CircuitBreaker(retry_interval_s=30)
    if breaker.allows():
        try: call(); breaker.record_success()
        except Exception: breaker.record_failure(seconds)   # no call until breaker.retry_at

A hung store (each probe as slow as the HTTP timeout) is probed less often: the interval doubles, up to
`max_retry_interval_s`, while the probes are slow.
"""

from __future__ import annotations

import time

SLOW_PROBE_S = 1.0  # a failure slower than this was a timeout, not a refused connection


class CircuitBreaker:
    """The store's state as the tracker's calls found it: up, or down since `down_since` with no call before
    `retry_at` (both time.monotonic())."""

    def __init__(self, retry_interval_s: float = 30.0, max_retry_interval_s: float = 300.0,
                 failures_before_open: int = 1) -> None:
        self.retry_interval_s = retry_interval_s
        self.max_retry_interval_s = max_retry_interval_s
        self.failures_before_open = failures_before_open
        self.down_since: float | None = None
        self.retry_at = 0.0
        self._interval = retry_interval_s
        self._failures = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def allows(self, force: bool = False) -> bool:
        """Whether a call should be tried now (`force`: whatever the state)."""
        return force or self.down_since is None or time.monotonic() >= self.retry_at

    def probe_next(self) -> None:
        """Let the next call through even during an outage: a last try before closing or registering."""
        self.retry_at = 0.0

    def record_failure(self, seconds: float) -> bool:
        """A call failed after `seconds`; True when this failure begins an outage."""
        self._failures += 1
        now = time.monotonic()
        began = self.down_since is None
        if began:
            self.down_since = now
            self._interval = self.retry_interval_s
        elif seconds > SLOW_PROBE_S:
            self._interval = min(self._interval * 2, self.max_retry_interval_s)
        if self._failures >= self.failures_before_open:
            self.retry_at = now + self._interval
        return began

    def record_success(self) -> float | None:
        """A call got through; the outage's length in seconds when this ends one, else None."""
        ended = None if self.down_since is None else time.monotonic() - self.down_since
        self.down_since = None
        self._failures = 0
        self.retry_at = 0.0
        return ended


def is_rejection(error: Exception) -> bool:
    """A request the store answered and refused (4xx other than timeout/rate limit): retrying will not help."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(error, (ValueError, TypeError))


def short_error(error: Exception, limit: int = 300) -> str:
    """An MLflow error's message (or the exception's type and text), cut to `limit` characters for a log line."""
    from mlflow.exceptions import MlflowException

    text = error.message if isinstance(error, MlflowException) else f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."
