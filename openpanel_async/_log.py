"""The library's logger, and a guard that keeps repeated problems to one line per interval."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("openpanel_async")


class Throttle:
    """Lets one message per key through per ``interval`` seconds and counts what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet; else how many messages of this key were held back since."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
