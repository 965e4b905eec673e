"""When to try an event again, and how long to wait first."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How failed requests are retried. All durations are seconds.

    Attributes:
        max_attempts: requests made for one event at most, the first included. Waiting out
            a 429 or a rate-limit pause does not use up an attempt.
        wait_initial: the backoff ceiling before the first retry; it doubles per attempt.
        wait_max: no single backoff wait is longer than this.
        wait_jitter: up to this much random time (and at most a tenth of the wait itself)
            is added to a wait the server asked for (``Retry-After``, ``x-ratelimit-reset``),
            so that clients do not return in step without wasting a short window.
        max_elapsed: an event is not retried once this long has passed since its first
            attempt, whatever caused the failures (429s included).
        max_retry_after: the longest pause the client accepts from a server's rate-limit
            headers; longer requests are cut to this.

    Backoff uses "full jitter": the wait before retry ``n`` is uniformly random between 0
    and ``min(wait_max, wait_initial * 2 ** (n - 1))``.
    """

    max_attempts: int = 6
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_jitter: float = 1.0
    max_elapsed: float = 300.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError("RetryPolicy.max_attempts: must be an int")
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts: must be at least 1")
        for name in ("wait_initial", "wait_max", "wait_jitter", "max_elapsed", "max_retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"RetryPolicy.{name}: must be a number of seconds")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"RetryPolicy.{name}: must be a finite number >= 0")
        if self.wait_max < self.wait_initial:
            raise ConfigError("RetryPolicy.wait_max: must not be less than wait_initial")

    def backoff(self, attempt: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = min(attempt - 1, 64)  # 2**64 already exceeds any sane wait_max
        ceiling = min(self.wait_max, self.wait_initial * 2.0**exponent)
        return (rand or random).uniform(0.0, ceiling)

    def server_wait(self, requested: float, rand: random.Random | None = None) -> float:
        """Seconds to pause when the server asked for ``requested`` seconds."""
        requested = max(0.0, requested)
        jitter = (rand or random).uniform(0.0, min(self.wait_jitter, requested / 10.0))
        return min(self.max_retry_after, requested + jitter)
