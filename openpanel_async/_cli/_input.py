"""The input of ``import``: opening it (and ``--failed``), and reading it in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError as FutureCancelledError
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

from ._common import EXIT_USAGE, CliError

# The client refuses an encoded event over 1 MiB; a longer line cannot hold a valid one,
# whatever its whitespace, and holding it whole would let one bad file eat the memory.
MAX_LINE_BYTES = 4 * 1024 * 1024


class LongLine(NamedTuple):
    """A line too long to be an event; only its size is kept."""

    size: int


def split_lines(chunks: Iterable[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[list[Any]]:
    """Batches of lines (bytes, without the newline) from chunks; overlong ones as LongLine."""
    held: list[bytes] = []  # the start of a line that continues in a later chunk
    held_size = 0
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        batch: list[bytes | LongLine] = []
        for piece in pieces[:-1]:
            batch.append(_join_line(held, held_size, piece, max_line))
            held, held_size = [], 0
        tail = pieces[-1]
        held_size += len(tail)
        if held_size <= max_line:
            held.append(tail)
        else:
            held.clear()
        if batch:
            yield batch
    if held_size:
        yield [_join_line(held, held_size, b"", max_line)]


def _join_line(held: list[bytes], held_size: int, piece: bytes, max_line: int) -> bytes | LongLine:
    size = held_size + len(piece)
    if size > max_line:
        return LongLine(size)
    return b"".join(held) + piece if held else piece


@dataclass
class Source:
    stream: IO[bytes]
    name: str
    size: int | None  # bytes, when known (a regular file): gives the progress bar its end


def open_source(path: str) -> Source:
    try:
        if path == "-":
            # Unbuffered: a read returns what the pipe holds instead of waiting for 64 KiB.
            stream: IO[bytes] = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
            name = "stdin"
        else:
            stream = open(path, "rb", buffering=0)  # noqa: SIM115
            name = path
        info = os.fstat(stream.fileno())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    return Source(stream, name, info.st_size if stat.S_ISREG(info.st_mode) else None)


def open_failed(path: str, source: Source) -> IO[bytes]:
    if path == "-":
        raise CliError("--failed needs a file name", EXIT_USAGE)
    with contextlib.suppress(OSError):
        if os.path.samefile(path, source.name):
            # Opening it for writing would empty the input before it is read.
            raise CliError(f"--failed {path} is the input file", EXIT_USAGE)
    try:
        return open(path, "wb")
    except OSError as exc:
        raise CliError(f"cannot write --failed {path}: {exc.strerror or exc}", EXIT_USAGE) from None


class _Abandoned(Exception):
    """The event loop went away while the reader thread was handing it lines."""


class LineReader:
    """Reads the input in a daemon thread and hands the event loop batches of lines.

    A thread, because a read from a pipe or a terminal blocks for as long as the writer
    likes; a daemon, so that Ctrl-C never waits for a read that may never return. The
    small queue keeps only a few chunks in memory: the file is never loaded whole.
    """

    CHUNK = 64 * 1024

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[Any] | OSError | None] = asyncio.Queue(maxsize=8)

    def start(self) -> None:
        threading.Thread(target=self._run, name="openpanel-async-reader", daemon=True).start()

    async def next_batch(self) -> list[Any] | None:
        """The next lines (bytes or LongLine), or None at the end of the input."""
        item = await self._queue.get()
        if isinstance(item, OSError):
            raise CliError(f"cannot read the input: {item.strerror or item}")
        return item

    def _chunks(self) -> Iterator[bytes]:
        while True:
            chunk: bytes | None = self._stream.read(self.CHUNK)
            if chunk is None:  # a non-blocking descriptor with nothing to read yet
                time.sleep(0.05)
                continue
            if not chunk:
                return
            yield chunk

    def _run(self) -> None:
        try:
            try:
                for batch in split_lines(self._chunks()):
                    self._put(batch)
            except OSError as exc:
                self._put(exc)
            else:
                self._put(None)
        except _Abandoned:
            return

    def _put(self, item: list[Any] | OSError | None) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
            future.result()
        except (RuntimeError, FutureCancelledError):
            raise _Abandoned from None
