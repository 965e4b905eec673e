"""What the commands print: error lines, numbers, tables and a progress line redrawn in place."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TextIO

from ._common import PROG

PROGRESS_INTERVAL = 0.1  # at most ten redraws a second

# Control characters (C0, DEL, C1) in data we print could move the cursor or recolour the
# terminal: the server prints payloads sent by anyone.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def error_line(message: str) -> None:
    print(f"{PROG}: error: {printable(message)}", file=sys.stderr, flush=True)


def count(n: int) -> str:
    return f"{n:,}"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def clock(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def table(rows: Sequence[tuple[str, str]]) -> str:
    label_width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    return "\n".join(f"  {label:<{label_width}}  {value:>{value_width}}" for label, value in rows)


class StatusLine:
    """One line redrawn in place with ``\\r`` on a terminal; silent anywhere else."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.enabled = enabled
        self._stream = stream
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        # A line wider than the terminal wraps, and \r would then redraw only its last row.
        text = text[: max(20, shutil.get_terminal_size().columns - 1)]
        padding = " " * max(0, self._width - len(text))
        self._stream.write(f"\r{text}{padding}")
        self._stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


class RateMeter:
    """Events per second over the last second or so, from a counter sampled on each tick."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, count: int) -> float:
        now = time.monotonic()
        samples = self._samples
        samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= 1.0:
            samples.popleft()
        then, before = samples[0]
        return (count - before) / (now - then) if now > then else 0.0


async def tick(render: Callable[[], None]) -> None:
    """Redraw a progress line until cancelled."""
    while True:
        render()
        await asyncio.sleep(PROGRESS_INTERVAL)
