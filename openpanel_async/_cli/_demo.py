"""``openpanel-async demo``: the client at work on a local server, or a small set to a project."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._client import OpenPanel
from .._retry import RetryPolicy
from .._stats import Stats
from ..errors import AuthenticationError, DeliveryError
from ._common import (
    ENV_CLIENT_ID,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    Target,
    describe_failure,
    env,
    make_client,
    on_signals,
    resolve_target,
)
from ._demo_events import DEMO_PROFILE, OtherCall, TrackCall, demo_calls, remote_demo_calls
from ._output import RateMeter, StatusLine, count, table, tick

if TYPE_CHECKING:
    from ..testing import LocalOpenPanel

DEMO_CLIENT_ID = "0d3e0000-0000-4000-8000-00000000de70"
_DEMO_SECRET = "local-demo-secret"  # only ever sent to the demo's own loopback server
# Past this many pending events track() would start dropping (the queue is bounded); the
# demo is about delivering everything, so the producer waits for the sender instead.
_DEMO_HIGH_WATER = 1_000
_DEMO_BATCH = 50
# The stretch where the server rate-limits: a share of the run, and the limit itself.
_DEMO_LIMIT = (5, 0.05)
_DEMO_LIMIT_FROM, _DEMO_LIMIT_TO = 0.35, 0.65
DEMO_RETRY = RetryPolicy(
    max_attempts=4,
    wait_initial=0.05,
    wait_max=0.5,
    wait_jitter=0.02,
    max_elapsed=10.0,
    max_retry_after=1.0,
)
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


def cmd_demo(args: argparse.Namespace) -> int:
    # Only an explicit --client-id sends demo data to a project: credentials that merely
    # sit in the environment (an app's .env, the README's export line) must not.
    explicit = args.api_url is not None or args.client_secret is not None
    if not args.local and args.client_id:
        return asyncio.run(_demo_remote(resolve_target(args, "demo"), args))
    if explicit and not args.local:
        raise CliError(
            "demo: --api-url and --client-secret need --client-id to send to a real "
            "project; without it the demo runs on a local server",
            EXIT_USAGE,
        )
    if not args.local and env(ENV_CLIENT_ID):
        print(
            f"demo: on a local server ({ENV_CLIENT_ID} is set, but demo data goes to a "
            "project only with --client-id)",
            file=sys.stderr,
        )
    return asyncio.run(_demo_local(args))


# --- on the local server -------------------------------------------------------------------


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
    meter = RateMeter()

    def render() -> None:
        stats = client.stats()
        rate = meter.rate(stats.accepted)
        text = (
            f"{time.monotonic() - started:4.1f} s  {count(round(rate)):>6} events/s  "
            f"delivered {count(stats.delivered)}  retried {count(stats.retries)}  "
            f"rate limited {count(stats.rate_limited)}  pending {count(stats.pending)}"
        )
        if stats.paused_for > 0:
            text += "  (paused)"
        status.show(text)

    return render


def demo_table(stats: Stats, costs: Sequence[int] | None) -> str:
    """The outcome; with ``costs`` (ns per track(), local runs) the drops and costs too."""
    rows = [
        ("accepted", count(stats.accepted)),
        ("delivered", count(stats.delivered)),
        ("failed", count(stats.failed)),
    ]
    if costs is not None:
        ordered = sorted(costs)
        mean = sum(ordered) / len(ordered) / 1000 if ordered else 0.0
        p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)] / 1000 if ordered else 0.0
        rows += [
            ("dropped", count(stats.dropped)),
            ("track() mean cost", f"{mean:.1f} µs"),
            ("track() p99 cost", f"{p99:.1f} µs"),
        ]
    rows.append(("429s honoured", count(stats.rate_limited)))
    return table(rows)


async def _demo_local(args: argparse.Namespace) -> int:
    from ..testing import LocalOpenPanel

    server = LocalOpenPanel(client_id=DEMO_CLIENT_ID, client_secret=_DEMO_SECRET)
    try:
        # A start that fails has already cleaned up after itself: nothing to stop.
        await server.start()
    except OSError as exc:
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
        request_timeout=args.timeout,
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
        ticker = asyncio.create_task(tick(_demo_progress(client, status, started)))
        stretch = asyncio.create_task(rate_limit_stretch(server, seconds))
        try:
            with on_signals(stop.set):
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
        f"\n{count(stats.accepted)} events in {elapsed:.1f} s "
        f"({count(round(stats.delivered / elapsed))} delivered per second), "
        f"{count(stats.retries)} retries; the server stored {count(stored)}.",
        flush=True,
    )
    if stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK if stats.failed == 0 and stats.dropped == 0 else EXIT_FAILURE


# --- to a real project ---------------------------------------------------------------------


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
    print(demo_table(stats, None), flush=True)
    if failures:
        refused = next((f for f in failures if isinstance(f, AuthenticationError)), None)
        raise CliError(describe_failure(refused or failures[0]))
    print(f"\nLook for the profile {DEMO_PROFILE!r} in your OpenPanel project.")
    return EXIT_OK
