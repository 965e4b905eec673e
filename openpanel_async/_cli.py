"""The ``openpanel-async`` command line: ``demo``, ``serve``, ``send`` and ``import``.

Standard-library argparse over the public client and the local test server; no dependency
beyond the package's own. User mistakes end as one line on stderr, never a traceback.

Exit statuses: 0 done; 1 failed (an event was not delivered, credentials refused, a port in
use, ...); 2 usage (bad arguments, missing credentials or file, an invalid event);
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import stat
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError as FutureCancelledError
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, NamedTuple, NoReturn, TextIO

from ._client import DEFAULT_API_URL, OpenPanel
from ._events import (
    UNSET,
    AssignGroup,
    Decrement,
    Event,
    Group,
    Identify,
    Increment,
    Track,
    decode_envelope,
    encode_event,
    stamp_track,
)
from ._retry import RetryPolicy
from ._stats import Stats
from ._version import __version__
from .errors import (
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    DeliveryError,
    InvalidEventError,
    ShutdownError,
)

if TYPE_CHECKING:
    from .testing import LocalOpenPanel, ReceivedRequest

PROG = "openpanel-async"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C

ENV_API_URL = "OPENPANEL_API_URL"
ENV_CLIENT_ID = "OPENPANEL_CLIENT_ID"
ENV_CLIENT_SECRET = "OPENPANEL_CLIENT_SECRET"

# A one-off command must fail fast against a dead server rather than retry for minutes.
SEND_RETRY = RetryPolicy(
    max_attempts=3,
    wait_initial=0.2,
    wait_max=1.0,
    wait_jitter=0.25,
    max_elapsed=15.0,
    max_retry_after=10.0,
)
# An import is one client: the jitter that keeps many clients from returning in step
# after a 429 only slows it down, so it is kept small. Everything else is the default.
IMPORT_RETRY = RetryPolicy(wait_jitter=0.25)

_PROGRESS_INTERVAL = 0.1  # at most ten redraws a second
_MAX_FAILURE_REPORTS = 20  # delivery failures shown one by one; the rest are counted
_MAX_INVALID_REPORTS = 200  # invalid input lines shown one by one; the rest are counted


class CliError(Exception):
    """A problem reported as one line on stderr, with the exit status to end with."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# --- small output helpers ------------------------------------------------------------------

# Control characters (C0, DEL, C1) in data we print could move the cursor or recolour the
# terminal: the server prints payloads sent by anyone.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _error_line(message: str) -> None:
    print(f"{PROG}: error: {_printable(message)}", file=sys.stderr, flush=True)


def _count(n: int) -> str:
    return f"{n:,}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _table(rows: Sequence[tuple[str, str]]) -> str:
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


class _RateMeter:
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


async def _tick(render: Callable[[], None]) -> None:
    while True:
        render()
        await asyncio.sleep(_PROGRESS_INTERVAL)


@contextlib.contextmanager
def _on_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` on the loop for SIGINT and SIGTERM while the block runs.

    Where the loop cannot take signal handlers (Windows), Ctrl-C stays a KeyboardInterrupt,
    which ``main`` turns into a one-line message.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# --- argument types ------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A --prop value: JSON when it parses (numbers, true, null, objects...), else the text.

    NaN and Infinity are not JSON and the server refuses them: they stay strings.
    """

    def refuse(constant: str) -> NoReturn:
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_property(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def parse_rate(text: str) -> tuple[int, float]:
    """``100/s``, ``100/10s``, ``600/min`` or ``100`` (per second) -> (requests, seconds)."""
    match = re.fullmatch(
        r"\s*(\d+)\s*(?:/\s*(\d+(?:\.\d+)?|\.\d+)?\s*(s|sec|m|min)?)?\s*", text, re.IGNORECASE
    )
    if match is None or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected REQUESTS/s such as 100/s, 100/10s or 600/min, got {text!r}"
        )
    count, amount, unit = match.groups()
    window = float(amount) if amount else 1.0
    if unit and unit.lower().startswith("m"):
        window *= 60.0
    if window <= 0:
        raise argparse.ArgumentTypeError(f"the window must be longer than 0, got {text!r}")
    return int(count), window


def parse_fraction(text: str) -> float:
    """``0.1`` or ``10%`` -> 0.1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.1 or 10%, got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0% and 100%), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {text!r}")
    return value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# --- credentials and the client ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where events go. ``str()`` never shows the secret."""

    api_url: str
    client_id: str
    client_secret: str | None = None

    def __str__(self) -> str:
        return f"{self.api_url} (client id {self.client_id})"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_target(args: argparse.Namespace, command: str) -> Target:
    """Options first, then the environment. There is no default project."""
    client_id = args.client_id or _env(ENV_CLIENT_ID)
    if not client_id:
        raise CliError(
            f"{command} needs credentials: pass --client-id (and --client-secret), or set "
            f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}",
            EXIT_USAGE,
        )
    api_url = args.api_url or _env(ENV_API_URL) or DEFAULT_API_URL
    secret = args.client_secret if args.client_secret is not None else _env(ENV_CLIENT_SECRET)
    return Target(api_url, client_id, secret)


_OPTION_NAMES = {
    "api_url": "--api-url",
    "client_id": "--client-id",
    "client_secret": "--client-secret",
}


def make_client(
    target: Target,
    *,
    on_error: Callable[[DeliveryError], Any],
    retry: RetryPolicy,
    request_timeout: float,
    shutdown_timeout: float,
    max_queue_size: int = 10_000,
    max_concurrency: int = 64,
) -> OpenPanel:
    try:
        return OpenPanel(
            client_id=target.client_id,
            client_secret=target.client_secret,
            api_url=target.api_url,
            retry=retry,
            on_error=on_error,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            max_queue_size=max_queue_size,
            max_concurrency=max_concurrency,
        )
    except ConfigError as exc:
        # The library names its arguments; the user typed options (or set variables).
        message = str(exc)
        field, sep, rest = message.partition(":")
        if sep and field in _OPTION_NAMES:
            message = f"{_OPTION_NAMES[field]}:{rest}"
        raise CliError(message, EXIT_USAGE) from None


def describe_failure(error: DeliveryError) -> str:
    if isinstance(error, AuthenticationError):
        return f"{error} (check the client id and secret)"
    return str(error)


# --- send ----------------------------------------------------------------------------------


def _properties(args: argparse.Namespace) -> Any:
    """The --prop pairs as a dict, or UNSET: an optional field is left out, never null."""
    pairs: list[tuple[str, Any]] | None = args.props
    return dict(pairs) if pairs else UNSET


def _optional(value: str | None) -> Any:
    return UNSET if value is None else value


def _build_track(args: argparse.Namespace) -> Event:
    # Stamped here rather than by the client, so that the body printed is the body sent.
    return stamp_track(
        Track(
            name=args.name,
            properties=_properties(args),
            profile_id=_optional(args.profile_id),
            groups=args.groups or UNSET,
        )
    )


def _build_identify(args: argparse.Namespace) -> Event:
    return Identify(
        profile_id=args.profile_id,
        first_name=_optional(args.first_name),
        last_name=_optional(args.last_name),
        email=_optional(args.email),
        avatar=_optional(args.avatar),
        properties=_properties(args),
    )


def _build_increment(args: argparse.Namespace) -> Event:
    return Increment(profile_id=args.profile_id, property=args.property, value=args.value)


def _build_decrement(args: argparse.Namespace) -> Event:
    return Decrement(profile_id=args.profile_id, property=args.property, value=args.value)


def _build_group(args: argparse.Namespace) -> Event:
    return Group(id=args.id, type=args.type, name=args.name, properties=_properties(args))


def _build_assign_group(args: argparse.Namespace) -> Event:
    return AssignGroup(group_ids=args.group_ids, profile_id=_optional(args.profile_id))


def cmd_send(args: argparse.Namespace) -> int:
    target = resolve_target(args, "send")
    build: Callable[[argparse.Namespace], Event] = args.build
    try:
        event = build(args)
    except InvalidEventError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    failures: list[DeliveryError] = []
    client = make_client(
        target,
        on_error=failures.append,
        retry=SEND_RETRY,
        request_timeout=args.timeout,
        # Room for every attempt to time out, and the backoff between them.
        shutdown_timeout=SEND_RETRY.max_attempts * args.timeout + 2.0,
    )
    asyncio.run(_send_one(client, event, args.ip, args.user_agent))
    if failures:
        raise CliError(describe_failure(failures[0]), EXIT_FAILURE)
    if client.stats().delivered != 1:  # cannot happen: every accepted event settles
        raise CliError("the event was not delivered", EXIT_FAILURE)
    # The client does not expose the success status or body: 2xx other than 202 is all
    # that "delivered" tells us.
    print(f"delivered: {encode_event(event).decode()}", flush=True)
    return EXIT_OK


async def _send_one(
    client: OpenPanel, event: Event, client_ip: str | None, user_agent: str | None
) -> None:
    async with client:
        try:
            await client.send(event, client_ip=client_ip, user_agent=user_agent)
        except InvalidEventError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    # Leaving the block drained the queue: delivered, or failed and reported to on_error.


# --- import --------------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
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


class Importer:
    """Feeds every line of the input through the client, and accounts for each one."""

    def __init__(
        self,
        source: Source,
        failed_out: IO[bytes] | None,
        failed_name: str | None,
        *,
        progress: bool,
        shutdown_timeout: float,
    ) -> None:
        self.source = source
        self.shutdown_timeout = shutdown_timeout
        self.failed_out = failed_out
        self.failed_name = failed_name
        self.client: OpenPanel | None = None
        self.status = StatusLine(sys.stderr, progress)
        self.line_no = 0
        self.handled = 0  # lines fully dealt with (sent, reported or skipped): resume after
        self.read_error: str | None = None
        self.bytes_done = 0
        self.invalid = 0
        self.failed_written = 0
        self.delivery_reports = 0
        self.refused: DeliveryError | None = None
        self.stopped = False  # the client refused more events (credentials refused)
        self.cut_off = 0  # failed at shutdown after a request went out: maybe stored
        self.write_error: OSError | None = None  # writing --failed failed
        self.interrupted = False
        self.aborted = False
        self.abort = asyncio.Event()
        self._phase: asyncio.Task[Any] | None = None  # what the first Ctrl-C cuts short
        self._meter = _RateMeter()

    # --- callbacks -------------------------------------------------------------------

    def on_error(self, error: DeliveryError) -> None:
        """The client's on_error: keep the failed event for a retry, and say why once."""
        self._keep(error.body)
        if isinstance(error, AuthenticationError):
            if self.refused is None:
                self.refused = error
            return  # reported once, at the end, as the error that stopped the import
        if isinstance(error, ShutdownError):
            # Expected after a Ctrl-C, and summed up in the report rather than listed.
            if error.attempts:
                self.cut_off += 1
            return
        self.delivery_reports += 1
        if self.delivery_reports <= _MAX_FAILURE_REPORTS:
            self._note(f"failed: {error}")
        elif self.delivery_reports == _MAX_FAILURE_REPORTS + 1:
            self._note("failed: ... (more delivery failures are counted, not shown)")

    def on_signal(self) -> None:
        if self.interrupted:
            self.abort.set()  # a second Ctrl-C: stop waiting for the drain
            return
        self.interrupted = True
        if self._phase is not None:
            self._phase.cancel()

    # --- feeding -------------------------------------------------------------------------

    async def feed(self, client: OpenPanel, reader: LineReader) -> None:
        try:
            while (batch := await reader.next_batch()) is not None:
                for line in batch:
                    self.line_no += 1
                    await self._one(client, line)
                    self.handled = self.line_no
                # send() only suspends when the queue is full: let the sender, the
                # progress line and the signal handlers run between batches.
                await asyncio.sleep(0)
        except ClientClosedError:
            self.stopped = True  # credentials refused: nothing more can go
        except CliError as exc:
            self.read_error = str(exc)  # what was sent is still delivered, then reported

    async def _one(self, client: OpenPanel, line: bytes | LongLine) -> None:
        if isinstance(line, LongLine):
            self.bytes_done += line.size + 1
            self._invalid(f"longer than {MAX_LINE_BYTES:,} bytes; not an event", None)
            return
        self.bytes_done += len(line) + 1
        if self.line_no == 1:
            line = line.removeprefix(_BOM)
        text = line.rstrip(b"\r")
        if not text.strip():
            return  # blank lines, a trailing one most of all, are not worth a complaint
        try:
            event, _client_id, _secret = decode_envelope(text)
            # Sends what the line holds; a track's __timestamp is kept by the client.
            await client.send(event)
        except InvalidEventError as exc:
            self._invalid(str(exc), text)

    def _invalid(self, reason: str, text: bytes | None) -> None:
        self.invalid += 1
        if text is not None:
            self._keep(text)
        if self.invalid <= _MAX_INVALID_REPORTS:
            self._note(f"line {self.line_no}: {reason}")
        elif self.invalid == _MAX_INVALID_REPORTS + 1:
            self._note("... (more invalid lines are counted, not shown)")

    def _keep(self, body: bytes) -> None:
        if self.failed_out is None or self.write_error is not None:
            return
        try:
            self.failed_out.write(body + b"\n")
        except OSError as exc:
            # Raised inside on_error the library would only log it: remember it instead.
            self.write_error = exc
            return
        self.failed_written += 1

    def _note(self, message: str) -> None:
        self.status.clear()
        print(_printable(message), file=sys.stderr, flush=True)

    # --- progress ----------------------------------------------------------------------

    def render(self) -> None:
        if not self.status.enabled or self.client is None:
            return
        stats = self.client.stats()
        settled = stats.delivered + stats.failed
        rate = self._meter.rate(settled)
        parts = [f"{_count(self.line_no)} lines", f"{_count(stats.delivered)} delivered"]
        parts.append(f"{_count(round(rate))}/s")
        expected = self._expected_events(stats.accepted)
        if expected is not None:
            done = min(1.0, settled / expected) if expected else 1.0
            parts.insert(0, f"[{'#' * round(done * 20):<20}] {done:4.0%}")
            if rate > 0 and done < 1:
                parts.append(f"ETA {_clock((expected - settled) / rate)}")
        if stats.paused_for > 0:
            parts.append("(rate limited)")
        self.status.show("  ".join(parts))

    def _expected_events(self, accepted: int) -> float | None:
        """Events in the whole input, extrapolated from the share of its bytes read so far.

        Reading runs ahead of delivery by up to a queue's worth of events, so the bar
        follows the events settled, not the bytes read.
        """
        size = self.source.size
        if not size or not self.bytes_done:
            return None
        return max(float(accepted), accepted * size / self.bytes_done)

    # --- the whole run ---------------------------------------------------------------------

    async def run(self, client: OpenPanel) -> int:
        self.client = client
        started = time.monotonic()
        reader = LineReader(self.source.stream)
        await client.start()
        reader.start()
        ticker = asyncio.create_task(_tick(self.render))
        try:
            with _on_signals(self.on_signal):
                await self._until_interrupted(self.feed(client, reader))
                # At the end of the input every event gets its full retry budget: the
                # shutdown timeout is only for a Ctrl-C, not for the tail of a big file.
                if not self.interrupted:
                    await self._until_interrupted(client.flush())
                if self.interrupted:
                    self._note(
                        f"interrupted: draining for up to {self.shutdown_timeout:g} s "
                        "(Ctrl-C again to stop now)"
                    )
                await self._close(client)
        finally:
            ticker.cancel()
            self.status.clear()
        return self.report(client.stats(), time.monotonic() - started)

    async def _until_interrupted(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as the phase that the first Ctrl-C cancels."""
        task = asyncio.create_task(work)
        self._phase = task
        try:
            await asyncio.wait([task])
        finally:
            self._phase = None
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error

    async def _close(self, client: OpenPanel) -> None:
        closing = asyncio.create_task(client.aclose())
        aborting = asyncio.create_task(self.abort.wait())
        await asyncio.wait({closing, aborting}, return_when=asyncio.FIRST_COMPLETED)
        aborting.cancel()
        # On an abort the close task is cancelled as the loop ends; what it had not
        # delivered still fails through on_error (and into --failed) before the file closes.
        self.aborted = not closing.done()

    def report(self, stats: Stats, elapsed: float) -> int:
        if self.refused is not None:
            _error_line(describe_failure(self.refused))
        if self.write_error is not None:
            error = self.write_error
            _error_line(f"cannot write to {self.failed_name}: {error.strerror or error}")
        if self.read_error is not None:
            _error_line(self.read_error)
        sent = stats.accepted
        counts = [
            f"{_plural(sent, 'line')} sent",
            f"{_count(stats.delivered)} delivered",
        ]
        if stats.failed:
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(stats.failed_by_reason.items()))
            counts.append(f"{_count(stats.failed)} failed ({reasons})")
        if self.invalid:
            counts.append(f"{_plural(self.invalid, 'invalid line')}")
        if stats.rate_limited:
            counts.append(f"{_plural(stats.rate_limited, 'rate limit')} (429) waited out")
        counts.append(f"in {elapsed:.1f} s")
        where = self.source.name
        if self.aborted or self.interrupted or self.stopped or self.read_error:
            # Lines after this one were not sent: a retry resumes from the next.
            why = "aborted" if self.aborted else "interrupted" if self.interrupted else "stopped"
            head = f"{why} after line {self.handled} of {where}"
        else:
            head = f"imported {_plural(self.line_no, 'line')} from {where}"
        print(f"{_printable(head)}: {', '.join(counts)}", flush=True)
        problems = stats.failed + self.invalid
        if self.cut_off:
            print(
                f"{_plural(self.cut_off, 'failed event')} had a request cut off at shutdown: "
                "the server may have stored them anyway"
            )
        if self.failed_name is not None and self.failed_written:
            print(f"{_plural(self.failed_written, 'line')} written to {self.failed_name}")
        elif problems and self.failed_name is None:
            print("(pass --failed FILE to keep the lines that failed, for a retry)")
        if self.interrupted or self.aborted:
            return EXIT_INTERRUPTED
        if problems or self.stopped or self.write_error or self.read_error:
            return EXIT_FAILURE
        return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    target = resolve_target(args, "import")
    source = open_source(args.file)
    with contextlib.closing(source.stream):
        failed_out = open_failed(args.failed, source) if args.failed else None
        with failed_out if failed_out is not None else contextlib.nullcontext():
            progress = sys.stderr.isatty() and not args.no_progress
            importer = Importer(
                source,
                failed_out,
                args.failed,
                progress=progress,
                shutdown_timeout=args.shutdown_timeout,
            )
            client = make_client(
                target,
                on_error=importer.on_error,
                retry=IMPORT_RETRY,
                request_timeout=args.timeout,
                shutdown_timeout=args.shutdown_timeout,
                max_queue_size=args.queue_size,
                max_concurrency=args.concurrency,
            )
            return asyncio.run(importer.run(client))


# --- serve ---------------------------------------------------------------------------------

_IP_HEADERS = ("openpanel-client-ip", "x-client-ip", "x-forwarded-for", "x-real-ip")


def _client_ip(request: ReceivedRequest) -> str | None:
    """The end user's IP the server would locate: ``__ip``, then the headers it reads."""
    ip = request.properties.get("__ip")
    if isinstance(ip, str) and ip:
        return ip
    for header in _IP_HEADERS:
        value = request.headers.get(header)
        if value:
            return value.split(",")[0].strip()
    return None


def _refusal(request: ReceivedRequest) -> str:
    """Why the server did not store the event, in a few words."""
    status = request.status
    if status is None:
        return "connection dropped"
    if status == 429:
        return "rate limited"
    if status == 401:
        return "credentials refused"
    if status == 202:
        return "dropped as sent by a bot"
    if status >= 500:
        return "simulated server error"
    if status == 400:
        try:
            decode_envelope(request.body)
        except InvalidEventError as exc:
            return str(exc)
        return "rejected"
    if status == 404:
        return f"no route {request.path}"
    return f"HTTP {status}"


def _word(value: object) -> str:
    """A value as one token: bare when it is one, JSON-quoted when it has spaces or quotes."""
    text = value if isinstance(value, str) else json.dumps(value)
    if text and re.fullmatch(r"[\w@.:/+\-#]+", text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _event_details(event_type: str | None, payload: dict[str, Any]) -> list[str]:
    """The fields that say what an event is; defensive, the payload is anyone's JSON."""
    parts: list[str] = []
    if event_type == "track":
        parts.append(_word(payload.get("name")))
    elif event_type == "group":
        parts.append(f"{_word(payload.get('id'))} ({_word(payload.get('type'))})")
        parts.append(f"name={_word(payload.get('name'))}")
    if "profileId" in payload:
        parts.append(f"profile={_word(payload['profileId'])}")
    if event_type == "identify":
        full_name = " ".join(
            str(payload[key]) for key in ("firstName", "lastName") if payload.get(key)
        )
        if full_name:
            parts.append(f"name={_word(full_name)}")
        parts.extend(
            f"{key}={_word(payload[key])}" for key in ("email", "avatar") if key in payload
        )
    elif event_type in ("increment", "decrement"):
        sign = "+" if event_type == "increment" else "-"
        parts.append(f"{_word(payload.get('property'))} {sign}{_word(payload.get('value', 1))}")
    groups = payload.get("groups", payload.get("groupIds"))
    if isinstance(groups, list) and groups:
        parts.append("groups=" + ",".join(_word(group) for group in groups))
    properties = payload.get("properties")
    if isinstance(properties, dict):
        shown = {k: v for k, v in properties.items() if k != "__timestamp"}
        if shown:
            parts.append(_json(shown))
    return parts


def _moment(request: ReceivedRequest) -> float:
    """The wall-clock time the request arrived (the server records a monotonic time)."""
    return time.time() - (time.monotonic() - request.arrived)


def _event_time_note(request: ReceivedRequest, arrived: float) -> str | None:
    """``at=...`` when the event says it happened well before it arrived (imports, retries)."""
    stamp = request.properties.get("__timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        happened = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return f"at={_word(stamp)}"
    return f"at={stamp}" if abs(arrived - happened) > 60 else None


def _stored(request: ReceivedRequest) -> bool:
    """Whether the server kept the event: any 2xx but 202 (a bot, dropped)."""
    status = request.status
    return status is not None and 200 <= status < 300 and status != 202


def format_request(request: ReceivedRequest) -> str:
    """One readable line: time, status, type, what the event is, client IP, user agent."""
    arrived = _moment(request)
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(arrived)) + f".{int(arrived * 1000) % 1000:03d}"
    )
    status = "---" if request.status is None else str(request.status)
    parts = [stamp, status, request.type or "-"]
    if _stored(request):
        parts.extend(_event_details(request.type, request.payload or {}))
        note = _event_time_note(request, arrived)
        if note is not None:
            parts.append(note)
    else:
        parts.append(f"-> {_refusal(request)}")
    parts.append(f"ip={_client_ip(request) or '-'}")
    parts.append(f"ua={_word(request.headers.get('user-agent', '-'))}")
    return _printable("  ".join(parts))


def format_request_json(request: ReceivedRequest) -> str:
    arrived = _moment(request)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(arrived).astimezone().isoformat(timespec="milliseconds"),
        "status": request.status,
        "type": request.type,
        "payload": request.payload,
        "client_ip": _client_ip(request),
        "user_agent": request.headers.get("user-agent"),
        "client_id": request.headers.get("openpanel-client-id"),  # never the secret
        "path": request.path,
    }
    if not _stored(request):
        record["error"] = _refusal(request)
    # json.dumps escapes C0 controls; C1 ones are escaped too, so a terminal stays safe.
    return _CONTROL_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", _json(record))


class RequestLog:
    """Prints what the local server receives and counts it for the summary."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self._out = out
        self._format = format_request_json if as_json else format_request
        self.stored: Counter[str] = Counter()  # by event type
        self.refused: Counter[str] = Counter()  # by status

    def write(self, request: ReceivedRequest) -> None:
        if _stored(request):
            self.stored[request.type or "?"] += 1
        else:
            self.refused["dropped" if request.status is None else str(request.status)] += 1
        self._out.write(self._format(request) + "\n")

    def summary(self, elapsed: float) -> str:
        total = sum(self.stored.values()) + sum(self.refused.values())
        stored = sum(self.stored.values())
        text = f"{_plural(total, 'request')} in {elapsed:.1f} s, {_plural(stored, 'event')} stored"
        if self.stored:
            text += " (" + ", ".join(f"{t} {n:,}" for t, n in self.stored.most_common()) + ")"
        if self.refused:
            refused = sorted(self.refused.items())
            text += "; not stored: " + ", ".join(f"{n:,} x {status}" for status, n in refused)
        return text


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


def _serve_banner(server: LocalOpenPanel, args: argparse.Namespace) -> str:
    lines = [f"{PROG} serve: a local OpenPanel server on {server.url} (POST /track)"]
    rules = [f"client id {args.client_id}" if args.client_id else "any client id"]
    if args.client_secret:
        rules.append("a client secret required")
    if args.rate_limit:
        count, window = args.rate_limit
        rules.append(f"rate limit {count:,} requests per {window:g} s")
    if args.fail_rate:
        rules.append(f"{args.fail_rate:.0%} of requests fail (5xx)")
    if args.delay:
        rules.append(f"{args.delay:g} s response delay")
    lines.append("  " + "; ".join(rules))
    lines.append(f"  point a client at it: {ENV_API_URL}={server.url}   (Ctrl-C to stop)")
    return "\n".join(lines)


async def _serve(args: argparse.Namespace) -> int:
    from .testing import LocalOpenPanel

    stop = asyncio.Event()
    failures: list[BaseException] = []
    log = RequestLog(sys.stdout, args.json)

    def print_request(request: ReceivedRequest) -> None:
        # One line per request as it is answered; nothing is kept: a dev server may run
        # for days. A closed stdout (| head) ends the server.
        try:
            log.write(request)
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            failures.append(exc)
            stop.set()

    server = LocalOpenPanel(
        client_id=args.client_id,
        client_secret=args.client_secret,
        port=args.port,
        response_delay=args.delay,
        rate_limit=args.rate_limit,
        fail_rate=args.fail_rate,
        seed=args.seed,
        on_request=print_request,
        record=False,
    )
    try:
        await server.start()
    except OSError as exc:
        raise CliError(_listen_error(args.port, exc)) from None
    started = time.monotonic()
    try:
        print(_serve_banner(server, args), file=sys.stderr, flush=True)
        with _on_signals(stop.set):
            await stop.wait()
    finally:
        await server.stop()
    if failures:
        raise failures[0]
    sys.stdout.flush()
    newline = "\n" if sys.stderr.isatty() else ""  # after the terminal's echoed ^C
    summary = log.summary(time.monotonic() - started)
    print(f"{newline}{PROG} serve: stopped: {summary}", file=sys.stderr, flush=True)
    return EXIT_OK


def _listen_error(port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on 127.0.0.1:{port}: the port is in use (pick another --port, "
            "or --port 0 for a free one)"
        )
    return f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"


# --- demo ----------------------------------------------------------------------------------

DEMO_CLIENT_ID = "0d3e0000-0000-4000-8000-00000000de70"
_DEMO_SECRET = "local-demo-secret"  # only ever sent to the demo's own loopback server
# Past this many pending events track() would start dropping (the queue is bounded); the
# demo is about delivering everything, so the producer waits for the sender instead.
_DEMO_HIGH_WATER = 1_000
_DEMO_BATCH = 50
# The stretch where the server rate-limits: a share of the run, and the limit itself.
_DEMO_LIMIT = (40, 0.1)
_DEMO_LIMIT_FROM, _DEMO_LIMIT_TO = 0.35, 0.65
DEMO_RETRY = RetryPolicy(
    max_attempts=4,
    wait_initial=0.05,
    wait_max=0.5,
    wait_jitter=0.02,
    max_elapsed=10.0,
    max_retry_after=1.0,
)


class TrackCall(NamedTuple):
    name: str
    properties: dict[str, Any]
    profile_id: str | None
    groups: list[str] | None
    user_agent: str
    client_ip: str


OtherCall = Callable[[OpenPanel], bool]

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Linus", "Margaret", "Ken", "Barbara", "Dennis")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Torvalds", "Hamilton", "Thompson", "Liskov")
_PAGES = ("/", "/pricing", "/docs", "/docs/quickstart", "/blog/launch", "/signup", "/settings")
_BUTTONS = ("start_trial", "upgrade", "invite_teammate", "export_csv", "dark_mode")
_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)
_ORGS = (("org_acme", "Acme Inc"), ("org_globex", "Globex"), ("org_initech", "Initech"))


def demo_calls(rng: random.Random, count: int = 2048) -> list[TrackCall | OtherCall]:
    """A realistic, reproducible mix: mostly track(), and every other event type."""
    users = [f"user_{n:04d}" for n in range(300)]
    kinds = ("track", "identify", "increment", "decrement", "group", "assign_group")
    weights = (82, 5, 5, 2, 2, 4)
    return [_demo_call(kind, rng, users) for kind in rng.choices(kinds, weights=weights, k=count)]


def _demo_call(kind: str, rng: random.Random, users: list[str]) -> TrackCall | OtherCall:
    user = rng.choice(users)
    org_id, org_name = rng.choice(_ORGS)
    if kind == "track":
        return _demo_track(rng, user, org_id)
    if kind == "identify":
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        plan = rng.choice(("free", "pro", "team"))
        email = f"{first.lower()}.{last.lower()}@example.com"
        return lambda op: op.identify(
            user, first_name=first, last_name=last, email=email, properties={"plan": plan}
        )
    if kind == "increment":
        return lambda op: op.increment(user, "logins")
    if kind == "decrement":
        credits = rng.randint(1, 5)
        return lambda op: op.decrement(user, "credits", credits)
    if kind == "group":
        seats = rng.randint(2, 250)
        return lambda op: op.group(org_id, "company", org_name, {"plan": "team", "seats": seats})
    return lambda op: op.assign_group([org_id], profile_id=user)


def _demo_track(rng: random.Random, user: str, org_id: str) -> TrackCall:
    page = rng.choice(_PAGES)
    name, properties = rng.choice(
        (
            ("page_view", {"path": page, "title": page.strip("/").title() or "Home"}),
            ("page_view", {"path": page, "referrer": "https://news.ycombinator.com/"}),
            ("button_clicked", {"button": rng.choice(_BUTTONS), "path": page}),
            ("search", {"query": rng.choice(("pricing", "sso", "api")), "results": 12}),
            ("checkout_completed", {"plan": "pro", "amount": 49.0, "currency": "EUR"}),
        )
    )
    signed_in = rng.random() < 0.7  # the rest are anonymous visitors
    return TrackCall(
        name=name,
        properties=properties,
        profile_id=user if signed_in else None,
        groups=[org_id] if signed_in and rng.random() < 0.5 else None,
        user_agent=rng.choice(_AGENTS),
        client_ip=f"203.0.113.{rng.randint(1, 254)}",  # TEST-NET-3: documentation addresses
    )


async def produce(
    client: OpenPanel,
    calls: Sequence[TrackCall | OtherCall],
    seconds: float,
    max_events: int | None,
    stop: asyncio.Event,
) -> list[int]:
    """Push events as fast as the client delivers them; return the cost of each track()."""
    costs: list[int] = []
    perf = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    limit = max_events if max_events is not None else float("inf")
    sent = 0
    index = 0
    while sent < limit and not stop.is_set() and time.monotonic() < deadline:
        if client.stats().pending >= _DEMO_HIGH_WATER:
            await asyncio.sleep(0.002)
            continue
        for _ in range(int(min(_DEMO_BATCH, limit - sent))):
            call = calls[index]
            index = (index + 1) % len(calls)
            if isinstance(call, TrackCall):
                t0 = perf()
                client.track(
                    call.name,
                    call.properties,
                    profile_id=call.profile_id,
                    groups=call.groups,
                    user_agent=call.user_agent,
                    client_ip=call.client_ip,
                )
                costs.append(perf() - t0)
            else:
                call(client)
            sent += 1
        await asyncio.sleep(0)  # track() never yields: let the sender work
    return costs


async def rate_limit_stretch(server: LocalOpenPanel, seconds: float) -> None:
    """Make the server rate-limit the client for the middle part of the run.

    ``rate_limit`` is a plain attribute the server reads on every request.
    """
    await asyncio.sleep(seconds * _DEMO_LIMIT_FROM)
    server.rate_limit = _DEMO_LIMIT
    try:
        await asyncio.sleep(seconds * (_DEMO_LIMIT_TO - _DEMO_LIMIT_FROM))
    finally:
        server.rate_limit = None


def _demo_progress(client: OpenPanel, status: StatusLine, started: float) -> Callable[[], None]:
    meter = _RateMeter()

    def render() -> None:
        stats = client.stats()
        rate = meter.rate(stats.accepted)
        text = (
            f"{time.monotonic() - started:4.1f} s  {_count(round(rate)):>6} events/s  "
            f"delivered {_count(stats.delivered)}  retried {_count(stats.retries)}  "
            f"rate limited {_count(stats.rate_limited)}  pending {_count(stats.pending)}"
        )
        if stats.paused_for > 0:
            text += "  (paused)"
        status.show(text)

    return render


def demo_table(stats: Stats, costs: Sequence[int]) -> str:
    ordered = sorted(costs)
    mean = sum(ordered) / len(ordered) / 1000 if ordered else 0.0
    p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)] / 1000 if ordered else 0.0
    return _table(
        [
            ("accepted", _count(stats.accepted)),
            ("delivered", _count(stats.delivered)),
            ("failed", _count(stats.failed)),
            ("dropped", _count(stats.dropped)),
            ("track() mean cost", f"{mean:.1f} µs"),
            ("track() p99 cost", f"{p99:.1f} µs"),
            ("429s honoured", _count(stats.rate_limited)),
        ]
    )


def cmd_demo(args: argparse.Namespace) -> int:
    explicit = args.api_url is not None or args.client_secret is not None
    if not args.local and (args.client_id or _env(ENV_CLIENT_ID)):
        return asyncio.run(_demo_remote(resolve_target(args, "demo"), args))
    if explicit and not args.local:
        raise CliError(
            f"demo: --api-url and --client-secret need --client-id (or {ENV_CLIENT_ID}) to "
            "send to a real project; without them the demo runs on a local server",
            EXIT_USAGE,
        )
    return asyncio.run(_demo_local(args))


async def _demo_local(args: argparse.Namespace) -> int:
    from .testing import LocalOpenPanel

    server = LocalOpenPanel(client_id=DEMO_CLIENT_ID, client_secret=_DEMO_SECRET)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise CliError(f"cannot start the local server: {exc.strerror or exc}") from None
    try:
        return await _demo_against(server, args)
    finally:
        await server.stop()


async def _demo_against(server: LocalOpenPanel, args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    client = make_client(
        Target(server.url, DEMO_CLIENT_ID, _DEMO_SECRET),
        on_error=lambda error: None,  # counted in stats(); the table shows them
        retry=DEMO_RETRY,
        request_timeout=5.0,
        shutdown_timeout=5.0,
    )
    limit, window = _DEMO_LIMIT
    print(
        f"{PROG} demo: the real client against a local OpenPanel server on {server.url}\n"
        f"  {seconds:g} s of every event type, as fast as they are delivered; the server\n"
        f"  rate-limits to {limit} requests per {window:g} s from "
        f"{seconds * _DEMO_LIMIT_FROM:.1f} s to {seconds * _DEMO_LIMIT_TO:.1f} s\n",
        flush=True,
    )
    status = StatusLine(sys.stdout, sys.stdout.isatty() and not args.no_progress)
    costs: list[int] = []  # nanoseconds per track() call
    calls = demo_calls(random.Random(2026))
    stop = asyncio.Event()
    started = time.monotonic()
    async with client:
        ticker = asyncio.create_task(_tick(_demo_progress(client, status, started)))
        stretch = asyncio.create_task(rate_limit_stretch(server, seconds))
        try:
            with _on_signals(stop.set):
                costs = await produce(client, calls, seconds, args.events, stop)
                stretch.cancel()
                await client.flush()
        finally:
            ticker.cancel()
            stretch.cancel()
            status.clear()
    elapsed = time.monotonic() - started
    stats = client.stats()
    print(demo_table(stats, costs))
    stored = len(server.events)
    print(
        f"\n{_count(stats.accepted)} events in {elapsed:.1f} s "
        f"({_count(round(stats.delivered / elapsed))} delivered per second), "
        f"{_count(stats.retries)} retries; the server stored {_count(stored)}.",
        flush=True,
    )
    if stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK if stats.failed == 0 and stats.dropped == 0 else EXIT_FAILURE


DEMO_PROFILE = "openpanel-async-demo"
# A real server stores a new profile asynchronously: the increment right after the
# identify may get "404 Profile not found" for a moment. The client retries those at
# wait_initial-spaced intervals (1, 2, 3 s here), so be more patient than `send`.
REMOTE_DEMO_RETRY = RetryPolicy(
    max_attempts=4,
    wait_initial=1.0,
    wait_max=4.0,
    wait_jitter=0.5,
    max_elapsed=30.0,
    max_retry_after=10.0,
)


def remote_demo_calls() -> list[tuple[str, OtherCall]]:
    """A small, readable set for a real project: one profile, one group, every event type."""
    profile = DEMO_PROFILE
    org = "openpanel-async-demo-org"
    props = {"source": f"{PROG} demo", "version": __version__}
    return [
        (
            f"identify {profile}",
            lambda op: op.identify(
                profile, first_name="Demo", last_name="User", email="demo@example.com",
                properties=props,
            ),
        ),
        (f"group {org}", lambda op: op.group(org, "company", "openpanel-async demo", props)),
        (f"assign_group {org}", lambda op: op.assign_group([org], profile_id=profile)),
        ("track demo_started", lambda op: op.track("demo_started", props, profile_id=profile)),
        (
            "track page_view /pricing",
            lambda op: op.track(
                "page_view", {"path": "/pricing"}, profile_id=profile, groups=[org]
            ),
        ),
        (
            "track button_clicked",
            lambda op: op.track(
                "button_clicked", {"button": "start_trial"}, profile_id=profile, groups=[org]
            ),
        ),
        ("increment demo_runs", lambda op: op.increment(profile, "demo_runs")),
        ("decrement demo_credits", lambda op: op.decrement(profile, "demo_credits")),
        ("track demo_finished", lambda op: op.track("demo_finished", props, profile_id=profile)),
    ]  # fmt: skip


async def _demo_remote(target: Target, args: argparse.Namespace) -> int:
    failures: list[DeliveryError] = []
    retry = REMOTE_DEMO_RETRY
    client_timeout = retry.max_attempts * (args.timeout + retry.wait_max)
    client = make_client(
        target,
        on_error=failures.append,
        retry=retry,
        request_timeout=args.timeout,
        shutdown_timeout=client_timeout,
    )
    calls = remote_demo_calls()
    print(f"{PROG} demo: sending {len(calls)} events to {target}", flush=True)
    async with client:
        for label, call in calls:
            call(client)
            print(f"  {label}")
        # Settle before closing: a refusal seen while open stops the rest being sent.
        await client.flush(timeout=client_timeout)
    stats = client.stats()
    print()
    print(
        _table(
            [
                ("accepted", _count(stats.accepted)),
                ("delivered", _count(stats.delivered)),
                ("failed", _count(stats.failed)),
                ("429s honoured", _count(stats.rate_limited)),
            ]
        ),
        flush=True,
    )
    if failures:
        refused = next((f for f in failures if isinstance(f, AuthenticationError)), None)
        raise CliError(describe_failure(refused or failures[0]))
    print(f"\nLook for the profile {DEMO_PROFILE!r} in your OpenPanel project.")
    return EXIT_OK


# --- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line rather than argparse's usage block: the usage is one --help away.
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="also show the client library's log"
    )
    return common


def _credential_options() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("where to send")
    group.add_argument(
        "--api-url",
        metavar="URL",
        help=f"the OpenPanel API (default: ${ENV_API_URL}, else {DEFAULT_API_URL})",
    )
    group.add_argument("--client-id", metavar="ID", help=f"default: ${ENV_CLIENT_ID}")
    group.add_argument(
        "--client-secret",
        metavar="SECRET",
        help=f"default: ${ENV_CLIENT_SECRET}; prefer the variable, a command line is visible "
        "to other users",
    )
    return parent


def _add_timeout(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default,
        metavar="SECONDS",
        help="give up on one request after this long (default: %(default)s)",
    )


def _add_send_parsers(commands: Any, common: _Parser, credentials: _Parser) -> None:
    send = commands.add_parser(
        "send",
        help="send one event and print the server's answer",
        description="Send one event, like the curl examples of the API guide. Exits 0 when "
        "it was delivered, 1 with the server's message when not.",
    )
    send.set_defaults(handler=cmd_send)
    kinds = send.add_subparsers(dest="event_type", metavar="TYPE", required=True)
    parents = [common, credentials]

    def kind(name: str, help: str, build: Callable[[argparse.Namespace], Event]) -> Any:
        parser = kinds.add_parser(name, help=help, description=help, parents=parents)
        parser.set_defaults(build=build)
        parser.add_argument("--ip", metavar="IP", help="the end user's IP, for geo location")
        parser.add_argument(
            "--user-agent", metavar="UA", help="the end user's user agent, for device detection"
        )
        _add_timeout(parser, 5.0)
        return parser

    def props(parser: Any) -> None:
        parser.add_argument(
            "--prop",
            dest="props",
            action="append",
            type=parse_property,
            metavar="KEY=VALUE",
            help="a property (repeatable); VALUE is JSON when it parses (42, true, null, "
            '{"a": 1}), else text; quote it as JSON to force text: key=\'"42"\'',
        )

    track = kind("track", "track a named event", _build_track)
    track.add_argument("name", metavar="NAME")
    props(track)
    track.add_argument("--profile-id", metavar="ID")
    track.add_argument(
        "--group", dest="groups", action="append", metavar="ID", help="a group id (repeatable)"
    )

    identify = kind("identify", "create or update a profile", _build_identify)
    identify.add_argument("profile_id", metavar="PROFILE_ID")
    identify.add_argument("--first-name")
    identify.add_argument("--last-name")
    identify.add_argument("--email")
    identify.add_argument("--avatar", metavar="URL")
    props(identify)

    for name, build, verb in (
        ("increment", _build_increment, "add to"),
        ("decrement", _build_decrement, "subtract from"),
    ):
        parser = kind(name, f"{verb} a numeric property of a profile", build)
        parser.add_argument("profile_id", metavar="PROFILE_ID")
        parser.add_argument("property", metavar="PROPERTY", help="dots mean nesting: a.b")
        parser.add_argument("--value", type=_number, default=1, help="> 0 (default: 1)")

    group = kind("group", "create or update a group", _build_group)
    group.add_argument("id", metavar="ID")
    group.add_argument("--type", required=True, help='the kind of group, e.g. "company"')
    group.add_argument("--name", required=True, help="its display name")
    props(group)

    assign = kind("assign_group", "link a profile to one or more groups", _build_assign_group)
    assign.add_argument("group_ids", metavar="GROUP_ID", nargs="+")
    assign.add_argument(
        "--profile-id", metavar="ID", help="without one the server uses its device id"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The asyncio-native OpenPanel client, from the command line.",
        epilog=f"Credentials come from --client-id/--client-secret/--api-url or "
        f"{ENV_CLIENT_ID}/{ENV_CLIENT_SECRET}/{ENV_API_URL}. Start with '{PROG} demo'.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    credentials = _credential_options()

    demo = commands.add_parser(
        "demo",
        help="see the client at work in a few seconds, on a local server",
        description="Start a local OpenPanel server and push a realistic mix of events "
        "through the real client, rate limits included; then show what happened. With "
        "credentials, send a small demo set to a real project instead.",
        parents=[common, credentials],
    )
    demo.set_defaults(handler=cmd_demo)
    demo.add_argument(
        "--seconds", type=_positive_float, default=3.0, help="how long to send (default: 3)"
    )
    demo.add_argument(
        "--events", type=_positive_int, metavar="N", help="stop after this many events"
    )
    demo.add_argument(
        "--local", action="store_true", help="use the local server even with credentials set"
    )
    demo.add_argument("--no-progress", action="store_true", help="no live progress line")
    _add_timeout(demo, 5.0)

    serve = commands.add_parser(
        "serve",
        help="run a local OpenPanel server and print what it receives",
        description="Run the local OpenPanel server of openpanel_async.testing in the "
        "foreground, printing one line per request; a summary on Ctrl-C.",
        parents=[common],
    )
    serve.set_defaults(handler=cmd_serve)
    serve.add_argument(
        "--port", type=_port, default=3333, help="(default: %(default)s; 0 picks a free one)"
    )
    serve.add_argument("--rate-limit", type=parse_rate, metavar="R/s", help="e.g. 100/s, 600/min")
    serve.add_argument(
        "--fail-rate",
        type=parse_fraction,
        default=0.0,
        metavar="P",
        help="share of requests answered 500/502/503, e.g. 0.1 or 10%%",
    )
    serve.add_argument(
        "--delay",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before each answer",
    )
    serve.add_argument("--seed", type=int, help="seed the simulated failures")
    serve.add_argument("--client-id", metavar="ID", help="require this client id (default: any)")
    serve.add_argument("--client-secret", metavar="SECRET", help="require this secret")
    serve.add_argument("--json", action="store_true", help="print JSON lines")

    _add_send_parsers(commands, common, credentials)

    importer = commands.add_parser(
        "import",
        help="send every event of a JSON Lines file",
        description='Send every {"type": ..., "payload": ...} line of FILE (- for stdin) '
        "through the client at full speed, keeping each track's __timestamp.",
        parents=[common, credentials],
    )
    importer.set_defaults(handler=cmd_import)
    importer.add_argument("file", metavar="FILE")
    importer.add_argument(
        "--failed", metavar="FILE", help="write the lines that failed here, to retry them"
    )
    importer.add_argument(
        "--concurrency",
        type=_positive_int,
        default=64,
        metavar="N",
        help="requests in flight at most (default: %(default)s)",
    )
    importer.add_argument(
        "--queue-size",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events held in memory at most (default: %(default)s)",
    )
    importer.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="on Ctrl-C, how long to drain (default: %(default)s)",
    )
    importer.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_timeout(importer, 10.0)
    return parser


# --- entry point -------------------------------------------------------------------------------


def _configure_logging(verbose: bool) -> None:
    log = logging.getLogger("openpanel_async")
    log.propagate = False
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.setLevel(logging.INFO)
    else:
        # The commands report failures themselves; the library's log would repeat them.
        handler = logging.NullHandler()
    log.handlers = [handler]


def _safe_streams() -> None:
    # Payloads are anyone's text: a terminal that cannot show a character gets an escape
    # rather than a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _safe_streams()
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as exc:
        _error_line(str(exc))
        return exc.status
    except KeyboardInterrupt:
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
