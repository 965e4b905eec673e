"""``openpanel-async import FILE``: every line of a JSON Lines file through the client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine
from typing import IO, Any

from .._client import OpenPanel
from .._events import decode_envelope
from .._retry import RetryPolicy
from .._stats import Stats
from ..errors import (
    AuthenticationError,
    ClientClosedError,
    DeliveryError,
    InvalidEventError,
    ShutdownError,
)
from ._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CliError,
    describe_failure,
    make_client,
    on_signals,
    resolve_target,
)
from ._input import MAX_LINE_BYTES, LineReader, LongLine, Source, open_failed, open_source
from ._output import RateMeter, StatusLine, clock, count, error_line, plural, printable, tick

# An import is one client: the jitter that keeps many clients from returning in step
# after a 429 only slows it down, so it is kept small. Everything else is the default.
IMPORT_RETRY = RetryPolicy(wait_jitter=0.25)

_MAX_FAILURE_REPORTS = 20  # delivery failures shown one by one; the rest are counted
_MAX_INVALID_REPORTS = 200  # invalid input lines shown one by one; the rest are counted
_BOM = b"\xef\xbb\xbf"


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
        self.started = 0.0
        self.elapsed = 0.0
        self.abort = asyncio.Event()
        self._phase: asyncio.Task[Any] | None = None  # what the first Ctrl-C cuts short
        self._meter = RateMeter()

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
        print(printable(message), file=sys.stderr, flush=True)

    # --- progress ----------------------------------------------------------------------

    def render(self) -> None:
        if not self.status.enabled or self.client is None:
            return
        stats = self.client.stats()
        settled = stats.delivered + stats.failed
        rate = self._meter.rate(settled)
        parts = [f"{count(self.line_no)} lines", f"{count(stats.delivered)} delivered"]
        parts.append(f"{count(round(rate))}/s")
        expected = self._expected_events(stats.accepted)
        if expected is not None:
            done = min(1.0, settled / expected) if expected else 1.0
            parts.insert(0, f"[{'#' * round(done * 20):<20}] {done:4.0%}")
            if rate > 0 and done < 1:
                parts.append(f"ETA {clock((expected - settled) / rate)}")
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

    async def run(self, client: OpenPanel) -> None:
        """Import everything (or until interrupted); ``report()`` then says how it went.

        The report comes after the event loop has ended: after a second Ctrl-C the close
        is still failing what it had not delivered (through on_error, into --failed) when
        this returns, and asyncio.run() lets it finish before the loop closes.
        """
        self.client = client
        self.started = time.monotonic()
        reader = LineReader(self.source.stream)
        await client.start()
        reader.start()
        ticker = asyncio.create_task(tick(self.render))
        try:
            with on_signals(self.on_signal):
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
            self.elapsed = time.monotonic() - self.started

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
        # delivered still fails through on_error (and into --failed) before the report.
        self.aborted = not closing.done()

    def report(self, stats: Stats, elapsed: float) -> int:
        if self.refused is not None:
            error_line(describe_failure(self.refused))
        if self.write_error is not None:
            error = self.write_error
            error_line(f"cannot write to {self.failed_name}: {error.strerror or error}")
        if self.read_error is not None:
            error_line(self.read_error)
        sent = stats.accepted
        counts = [
            f"{plural(sent, 'line')} sent",
            f"{count(stats.delivered)} delivered",
        ]
        if stats.failed:
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(stats.failed_by_reason.items()))
            counts.append(f"{count(stats.failed)} failed ({reasons})")
        if self.invalid:
            counts.append(f"{plural(self.invalid, 'invalid line')}")
        if stats.rate_limited:
            counts.append(f"{plural(stats.rate_limited, 'rate limit')} (429) waited out")
        counts.append(f"in {elapsed:.1f} s")
        where = self.source.name
        if self.aborted or self.interrupted or self.stopped or self.read_error:
            # Lines after this one were not sent: a retry resumes from the next.
            why = "aborted" if self.aborted else "interrupted" if self.interrupted else "stopped"
            head = f"{why} after line {self.handled} of {where}"
        else:
            head = f"imported {plural(self.line_no, 'line')} from {where}"
        print(f"{printable(head)}: {', '.join(counts)}", flush=True)
        problems = stats.failed + self.invalid
        if self.cut_off:
            print(
                f"{plural(self.cut_off, 'failed event')} had a request cut off at shutdown: "
                "the server may have stored them anyway"
            )
        if self.failed_name is not None and self.failed_written:
            print(f"{plural(self.failed_written, 'line')} written to {self.failed_name}")
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
            asyncio.run(importer.run(client))
            return importer.report(client.stats(), importer.elapsed)
