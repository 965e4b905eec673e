"""Reading the server's rate-limit headers: pure functions, the clock passed in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

# An x-ratelimit-reset this large cannot be seconds to wait: it is an epoch timestamp.
_EPOCH_THRESHOLD = 1_000_000_000.0
# Very old versions of the server's rate-limit plugin sent milliseconds. No server asks a
# client to pause for more than a day, so a larger number of "seconds" is milliseconds.
_MILLISECONDS_THRESHOLD = 86_400.0


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_retry_after(value: str, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date."""
    number = _number(value)
    if number is not None:
        return max(0.0, number)
    try:
        moment = parsedate_to_datetime(value.strip())
        if moment.tzinfo is None:  # HTTP dates are GMT by definition
            return None
        return max(0.0, moment.timestamp() - now_wall)
    except Exception:
        # TypeError, ValueError, IndexError for what is no date; OverflowError for an
        # absurd year or zone offset. A header must not crash the sender.
        return None


def parse_reset(value: str, now_wall: float) -> float | None:
    """Seconds to wait from an ``x-ratelimit-reset`` value (seconds; tolerant of old forms)."""
    number = _number(value)
    if number is None:
        return None
    if number >= _EPOCH_THRESHOLD:
        return max(0.0, number - now_wall)
    if number > _MILLISECONDS_THRESHOLD:
        return number / 1000.0
    return max(0.0, number)


def requested_wait(headers: Mapping[str, str], now_wall: float) -> float | None:
    """The pause a response asks for: ``Retry-After`` first, then ``x-ratelimit-reset``.

    ``headers`` must look keys up without case (aiohttp's CIMultiDictProxy does).
    """
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        wait = parse_retry_after(retry_after, now_wall)
        if wait is not None:
            return wait
    reset = headers.get("x-ratelimit-reset")
    if reset is not None:
        return parse_reset(reset, now_wall)
    return None


def window_budget(headers: Mapping[str, str], now_wall: float) -> tuple[int, float] | None:
    """(requests left, seconds until the window resets) when a response says both."""
    remaining = headers.get("x-ratelimit-remaining")
    reset = headers.get("x-ratelimit-reset")
    if remaining is None or reset is None:
        return None
    left = _number(remaining)
    wait = parse_reset(reset, now_wall)
    if left is None or wait is None:
        return None
    return int(left), wait


def window_limit(headers: Mapping[str, str]) -> int | None:
    """Requests allowed per window (``x-ratelimit-limit``), when the response says."""
    value = headers.get("x-ratelimit-limit")
    number = None if value is None else _number(value)
    return None if number is None or number < 1 else int(number)
