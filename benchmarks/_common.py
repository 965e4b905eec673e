"""Shared pieces of the benchmark scripts: events, the minimal sender, figures, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiohttp
import msgspec

import openpanel_async
from openpanel_async import OpenPanel

CLIENT_ID = "5f1c1c1e-0000-4000-8000-000000000001"
CLIENT_SECRET = "bench-secret-not-checked"

# The typical event of the issue: a name, 5 properties and a profile id.
TYPICAL_NAME = "page_view"
TYPICAL_PROPERTIES: dict[str, Any] = {
    "path": "/pricing",
    "referrer": "https://www.google.com/",
    "plan": "pro",
    "items": 3,
    "price": 19.99,
}
TYPICAL_PROFILE_ID = "user_12345"
_EXAMPLE_TIMESTAMP = "2026-11-26T08:00:00.000Z"

T = TypeVar("T")
P = ParamSpec("P")


def large_properties() -> dict[str, Any]:
    """About 2.5 KB of JSON: a checkout with ten line items and assorted attributes."""
    props: dict[str, Any] = {
        f"attribute_{i:02d}": f"value number {i} of a fairly descriptive attribute"
        for i in range(20)
    }
    props["items"] = [
        {"sku": f"SKU-{i:05d}", "name": f"Product {i}", "qty": i % 3 + 1, "price": 9.99 + i}
        for i in range(10)
    ]
    props["total"] = 1234.5
    props["coupon"] = "WINTER-2026"
    props["utm"] = {"source": "newsletter", "medium": "email", "campaign": "black-friday"}
    return props


LARGE_NAME = "checkout_completed"


def track_body(name: str, properties: dict[str, Any], profile_id: str) -> bytes:
    """The request body the library sends for ``track(name, properties, profile_id=...)``."""
    return msgspec.json.encode(
        {
            "type": "track",
            "payload": {
                "name": name,
                "properties": {**properties, "__timestamp": _EXAMPLE_TIMESTAMP},
                "profileId": profile_id,
            },
        }
    )


def client_headers() -> dict[str, str]:
    """The headers the library sends, so that the minimal sender sends as many bytes."""
    version = openpanel_async.__version__
    return {
        "content-type": "application/json",
        "openpanel-client-id": CLIENT_ID,
        "openpanel-client-secret": CLIENT_SECRET,
        "openpanel-sdk-name": "openpanel-async",
        "openpanel-sdk-version": version,
        "user-agent": f"openpanel-async/{version}",
    }


# The library's HTTP client for this run: --http-client (default: the library's default).
HTTP_CLIENT = {"name": "aiohttp"}


def make_client(url: str, **options: Any) -> OpenPanel:
    options.setdefault("http_client", HTTP_CLIENT["name"])
    return OpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, api_url=url, **options)


def quiet_library_logs() -> None:
    """Benchmarks abandon queued events on purpose; the close-time warning is noise here."""
    logging.getLogger("openpanel_async").setLevel(logging.ERROR)


# --- the minimal hand-written sender (the baseline of the delivery benchmarks) --------------


def minimal_session(concurrency: int) -> aiohttp.ClientSession:
    """The minimal sender's session: one keep-alive pool of ``concurrency`` connections."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector)


async def minimal_send_n(
    url: str,
    body: bytes,
    count: int,
    concurrency: int,
    session: aiohttp.ClientSession | None = None,
) -> float:
    """POST ``body`` ``count`` times with ``concurrency`` requests in flight; elapsed seconds.

    One ClientSession (``session``, or a new one), N worker coroutines, a pre-encoded body,
    no queue, no retries: the least an aiohttp client can do per event. Raises if any
    answer is not 200.
    """
    if session is None:
        async with minimal_session(concurrency) as own:
            return await minimal_send_n(url, body, count, concurrency, own)
    target = url + "/track"
    headers = client_headers()
    left = count
    bad = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left, bad
        while left > 0:
            left -= 1
            async with session.post(target, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    bad += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if bad:
        raise RuntimeError(f"minimal sender: {bad} requests were not answered 200")
    return elapsed


class MinimalQueueSender:
    """The minimal sender fed by a producer: encode per event, a plain queue, N workers."""

    def __init__(self, url: str, concurrency: int) -> None:
        self._target = url + "/track"
        self._headers = client_headers()
        self._concurrency = concurrency
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._encoder = msgspec.json.Encoder()
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.delivered = 0

    async def __aenter__(self) -> MinimalQueueSender:
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=0)
        self._session = aiohttp.ClientSession(connector=connector)
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self._concurrency)]
        return self

    def track(self, name: str, properties: dict[str, Any], profile_id: str) -> None:
        envelope = {
            "type": "track",
            "payload": {
                "name": name,
                "properties": {**properties, "__timestamp": _EXAMPLE_TIMESTAMP},
                "profileId": profile_id,
            },
        }
        self._queue.put_nowait(self._encoder.encode(envelope))

    async def _worker(self) -> None:
        session = self._session
        assert session is not None
        while True:
            body = await self._queue.get()
            async with session.post(self._target, data=body, headers=self._headers) as response:
                await response.read()
            self.delivered += 1
            self._queue.task_done()

    async def drain(self) -> None:
        await self._queue.join()

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


# --- measuring --------------------------------------------------------------------------------


def timer_overhead_ns(samples: int = 200_000) -> int:
    """The median cost of one ``perf_counter_ns()`` pair, to subtract from per-call timings."""
    pc = time.perf_counter_ns
    values = [0] * samples
    for i in range(samples):
        t0 = pc()
        t1 = pc()
        values[i] = t1 - t0
    values.sort()
    return values[samples // 2]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loop_names() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def run_on(
    loop_name: str, function: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``function(*args, **kwargs)`` on a fresh asyncio or uvloop event loop."""
    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(function(*args, **kwargs))
    with asyncio.Runner() as runner:
        return runner.run(function(*args, **kwargs))


# --- figures and reports ----------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure, its baseline from the same run, and an optional goal."""

    key: str
    label: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    goal: str | None = None
    passed: bool | None = None
    ratio: float | None = field(default=None)

    def __post_init__(self) -> None:
        if (
            self.ratio is None
            and self.value is not None
            and self.baseline not in (None, 0)
            and math.isfinite(self.value)
        ):
            assert self.baseline is not None
            self.ratio = self.value / self.baseline


class Report:
    def __init__(self, script: str, title: str, quick: bool) -> None:
        self.script = script
        self.title = title
        self.quick = quick
        self.figures: list[Figure] = []
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        self._start = time.perf_counter()

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "script": self.script,
            "title": self.title,
            "quick": self.quick,
            "elapsed_s": round(time.perf_counter() - self._start, 2),
            "environment": environment(),
            "figures": [asdict(f) for f in self.figures],
            "notes": self.notes,
            "details": self.details,
        }

    def print(self) -> None:
        print(f"\n== {self.title} ({self.script}{', quick' if self.quick else ''}) ==")
        print(format_table([asdict(f) for f in self.figures], with_script=False))
        for text in self.notes:
            print(f"  note: {text}")
        print(f"  ({time.perf_counter() - self._start:.1f} s)")


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "library": openpanel_async.__version__,
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(rows: Sequence[dict[str, Any]], *, with_script: bool) -> str:
    header = ["figure", "value", "unit", "baseline", "ratio", "goal", "status"]
    if with_script:
        header.insert(0, "script")
    lines: list[list[str]] = []
    for row in rows:
        status = "" if row["passed"] is None else ("PASS" if row["passed"] else "MISS")
        baseline = format_number(row["baseline"])
        if row["baseline"] is not None and row["baseline_label"]:
            baseline = f"{baseline} ({row['baseline_label']})"
        cells = [
            row["label"],
            format_number(row["value"]),
            row["unit"],
            baseline,
            "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
            row["goal"] or "",
            status,
        ]
        if with_script:
            cells.insert(0, row.get("script", ""))
        lines.append(cells)
    widths = [
        max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    numeric = {"value", "ratio"}
    out = []
    for cells in [header, ["-" * w for w in widths], *lines]:
        parts = []
        for i, cell in enumerate(cells):
            name = header[i]
            parts.append(cell.rjust(widths[i]) if name in numeric else cell.ljust(widths[i]))
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def parse_args(
    description: str,
    argv: Sequence[str] | None,
    setup: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """The common options (``--quick``, ``--json PATH``) plus the script's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--http-client",
        choices=("aiohttp", "builtin"),
        default="aiohttp",
        help="the library's HTTP client to measure (OpenPanel(http_client=...))",
    )
    if setup is not None:
        setup(parser)
    args = parser.parse_args(argv)
    HTTP_CLIENT["name"] = args.http_client
    return args


def finish(report: Report, json_path: Path | None) -> dict[str, Any]:
    report.print()
    result = report.as_dict()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str))
    sys.stdout.flush()
    return result
