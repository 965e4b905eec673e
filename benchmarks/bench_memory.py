"""4. Memory: bytes per queued event with 10,000 and 100,000 events waiting.

Events are tracked on a client whose sender is not running (tracked before start(), as
the library allows), so every one of them waits in the queue; the bytes held per event are
the growth of memory divided by the number of events. Two measures, each in a fresh child
process per case so that one case's freed memory cannot serve the next:

* tracemalloc: the growth of the traced Python heap (exact, allocator-independent);
* RSS: the growth of the resident set from /proc/self/statm (what the OS sees: includes
  allocator slack; noisier, measured without tracemalloc running).

Baseline, same run: the least memory an encoded event can take in a Python queue: the
``bytes`` object of its request body (``sys.getsizeof``) plus one deque slot (8 bytes).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    LARGE_NAME,
    TYPICAL_NAME,
    TYPICAL_PROFILE_ID,
    TYPICAL_PROPERTIES,
    Figure,
    Report,
    finish,
    large_properties,
    make_client,
    parse_args,
    quiet_library_logs,
    rss_bytes,
    track_body,
)

_URL = "http://127.0.0.1:9"  # never contacted: the client is not started


def _event(kind: str) -> tuple[str, dict[str, Any]]:
    if kind == "typical":
        return TYPICAL_NAME, TYPICAL_PROPERTIES
    return LARGE_NAME, large_properties()


def measure_child(kind: str, count: int, method: str) -> dict[str, Any]:
    """In a fresh process: the memory growth of ``count`` queued events of ``kind``."""
    quiet_library_logs()
    name, props = _event(kind)
    op = make_client(_URL, max_queue_size=count + 10)
    # Warm up the code paths and caches. Few events: freed warm-up memory would be reused
    # by the measured events and hide part of their RSS.
    warm = make_client(_URL, max_queue_size=100)
    for _ in range(50):
        warm.track(name, props, profile_id=TYPICAL_PROFILE_ID)
    del warm
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = rss_bytes()
    accepted = 0
    for _ in range(count):
        accepted += op.track(name, props, profile_id=TYPICAL_PROFILE_ID)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if method == "tracemalloc" else rss_bytes()
    if method == "tracemalloc":
        tracemalloc.stop()
    stats = op.stats()
    return {
        "kind": kind,
        "count": count,
        "method": method,
        "accepted": accepted,
        "pending": stats.pending,
        "bytes_per_event": (after - before) / count,
    }


def _baseline(kind: str) -> dict[str, Any]:
    name, props = _event(kind)
    body = track_body(name, props, TYPICAL_PROFILE_ID)
    return {"body_len": len(body), "bytes_per_event": sys.getsizeof(body) + 8}


def _run_child(kind: str, count: int, method: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(count), method],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    def setup(parser: Any) -> None:
        parser.add_argument(
            "--child",
            nargs=3,
            metavar=("KIND", "COUNT", "METHOD"),
            help="internal: measure one case and print JSON",
        )

    args = parse_args(__doc__ or "", argv, setup)
    if args.child:
        kind, count, method = args.child
        result = measure_child(kind, int(count), method)
        print(json.dumps(result))
        return result
    quick: bool = args.quick
    counts = [10_000, 20_000] if quick else [10_000, 100_000]
    report = Report("bench_memory", "4. Memory per queued event", quick)
    cases: list[dict[str, Any]] = []
    for kind in ("typical", "large"):
        baseline = _baseline(kind)
        report.details[f"baseline_{kind}"] = baseline
        for count in counts:
            for method in ("tracemalloc", "rss"):
                case = _run_child(kind, count, method)
                cases.append(case)
                goal = passed = None
                if kind == "typical" and method == "tracemalloc":
                    goal = "<= 400 B"
                    passed = case["bytes_per_event"] <= 400
                report.add(
                    Figure(
                        f"bytes_per_event_{kind}_{count}_{method}",
                        f"{kind} event, {count:,} queued, {method}",
                        case["bytes_per_event"],
                        "B/event",
                        baseline["bytes_per_event"],
                        "bytes object + deque slot",
                        goal,
                        passed,
                    )
                )
                if case["pending"] != count:
                    report.note(f"{kind}/{count}/{method}: only {case['pending']} queued")
    report.details["cases"] = cases
    report.note(
        f"request body: typical {report.details['baseline_typical']['body_len']} B, large "
        f"{report.details['baseline_large']['body_len']} B; goal judged on tracemalloc "
        "(RSS moves in pages and arenas: the larger count is the meaningful one)."
    )
    return finish(report, args.json)


if __name__ == "__main__":
    main()
