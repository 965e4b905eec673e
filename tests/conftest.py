from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from openpanel_async import OpenPanel, RetryPolicy, Stats
from openpanel_async.testing import LocalOpenPanel

CLIENT_ID = "5f1c1c1e-0000-4000-8000-00000000abcd"
CLIENT_SECRET = "sec_do_not_leak_42"

# Tiny timings so that retry scenarios take milliseconds, not seconds.
FAST_RETRY = RetryPolicy(
    max_attempts=4,
    wait_initial=0.01,
    wait_max=0.04,
    wait_jitter=0.0,
    max_elapsed=5.0,
    max_retry_after=2.0,
)


# Which HTTP client make_client() uses; test_delivery.py runs every test with both.
HTTP_CLIENT = {"name": "aiohttp"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[LocalOpenPanel]:
    async with LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as srv:
        yield srv


def make_client(server: LocalOpenPanel, **kwargs: object) -> OpenPanel:
    options: dict[str, object] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "api_url": server.url,
        "retry": FAST_RETRY,
        "request_timeout": 2.0,
        "shutdown_timeout": 2.0,
        "http_client": HTTP_CLIENT["name"],
    }
    options.update(kwargs)
    return OpenPanel(**options)  # type: ignore[arg-type]


def assert_accounted(stats: Stats, *, closed: bool = False) -> None:
    """The accounting identity, and nothing pending once closed."""
    assert stats.accepted == stats.delivered + stats.failed + stats.pending
    assert stats.failed == sum(stats.failed_by_reason.values())
    assert stats.dropped == sum(stats.dropped_by_reason.values())
    if closed:
        assert stats.pending == 0
        assert stats.in_flight == 0


def run_in_fork(child: Callable[[], Coroutine[Any, Any, bool]]) -> int:
    """Fork; in the child, run ``child()`` in a fresh event loop and exit with 0 if it
    returned True (3 if False, 2 if it raised). Returns the child's exit status.

    Call it from a worker thread (no running loop there). The child's verdict travels in
    its exit status; an alarm kills a child that hangs, so the parent never waits forever.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.alarm(20)
            code = 0 if asyncio.run(child()) else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
