"""Pacing to the server's announced budget: ``x-ratelimit-remaining`` until the window resets.

When answers carry the rate-limit headers, the client spends what the current window has
left and then waits for the window's end, instead of running into 429s. Times are the
event loop's clock (``now``); the headers' reset is read against the wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from . import _ratelimit

# How often a worker looks again when a fresh window's budget is spent and no answer has
# reported the remaining budget yet.
BUDGET_POLL = 0.005


class WindowBudget:
    """What the current rate-limit window still allows, as the last answer reported it."""

    __slots__ = ("_max_wait", "_until", "_window_end", "_window_limit", "remaining")

    def __init__(self, max_wait: float) -> None:
        self._max_wait = max_wait  # a longer window is treated as this long
        # Requests the window still allows; None: the server does not limit us (or said
        # nothing usable), so nothing is paced.
        self.remaining: int | None = None
        self._until = 0.0  # when the window ends; inf: a new window, its end not yet told
        self._window_limit: int | None = None  # x-ratelimit-limit: a fresh window's budget
        self._window_end = 0.0  # when the current window ends, as seen at its first answer

    def read(self, headers: Mapping[str, str], now: float, now_wall: float, in_flight: int) -> None:
        """Take the budget from one answer's headers (``in_flight``: requests still out)."""
        if "x-ratelimit-remaining" not in headers:
            self.remaining = None  # the server stopped limiting us
            return
        budget = _ratelimit.window_budget(headers, now_wall)
        if budget is None:
            self.remaining = None  # nothing usable to pace by
            return
        remaining, reset = budget
        # A window longer than we accept to wait is treated as that long, like Retry-After.
        reset = min(reset, self._max_wait)
        # Requests still in flight were sent after the server counted this one.
        self.remaining = remaining - in_flight
        until = now + reset
        limit = _ratelimit.window_limit(headers)
        if limit is not None:
            self._window_limit = limit
            if remaining == limit - 1:
                # The first answer of a window: its reset spans the whole window. Servers
                # that round the reset up to whole seconds (the real one does) would
                # otherwise keep us waiting up to a second past every window's end.
                self._window_end = until
        if now < self._window_end < until:
            until = self._window_end
        self._until = until

    def wait(self, now: float, in_flight: int) -> tuple[float, bool]:
        """Before sending: ``(0.0, False)`` when a request may go now.

        Else ``(seconds, whole_client)``: wait that long and look again. ``whole_client``:
        the window's end is known, so every request should pause until it (no jitter:
        clients sharing the limit may all start at the boundary; the window's count, not
        its first instant, is what is limited). Otherwise this worker polls for an answer
        that tells the new window's budget.
        """
        if self.remaining is None:
            return 0.0, False
        if now >= self._until:
            # A new window: its budget is the limit, until an answer says more.
            self.remaining = self._window_limit
            self._until = math.inf
            if self.remaining is None:
                return 0.0, False
        if self.remaining > 0:
            return 0.0, False
        if self._until < math.inf:
            return self._until - now, True
        if in_flight == 0:
            # No answer can come to tell us more (those requests failed on the network):
            # stop guessing, send again.
            self.remaining = None
            return 0.0, False
        # A fresh window's budget is spent and no answer has told us more yet: wait a
        # moment for one rather than guess.
        return BUDGET_POLL, False

    def spend(self) -> None:
        """One request is going out."""
        if self.remaining is not None:
            self.remaining -= 1
