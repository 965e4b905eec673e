"""Process events: fork, interpreter exit, and a client garbage-collected unclosed."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import textwrap
import time

import pytest

from openpanel_async import OpenPanel
from openpanel_async._client import _EXIT_GRACE
from openpanel_async.testing import LocalOpenPanel, Reply

from .conftest import CLIENT_ID, CLIENT_SECRET, FAST_RETRY, make_client, run_in_fork

pytestmark = pytest.mark.anyio


def _fork_and_use(op: OpenPanel) -> int:
    """Runs in a worker thread; returns the child's exit status."""

    async def child() -> bool:
        before = op.stats()
        # The parent's queue, counters and connections are not the child's.
        assert (before.accepted, before.pending, before.state) == (0, 0, "new")
        op.track("from_child", {"pid": os.getpid()})
        ok = await op.flush(timeout=5)
        await op.aclose()
        return ok and op.stats().delivered == 1

    return run_in_fork(child)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_client_created_before_fork_works_in_the_child(server: LocalOpenPanel) -> None:
    async with make_client(server) as op:
        op.track("parent_before")
        assert await op.flush(timeout=5)
        op.track("parent_pending")  # still queued in the parent when it forks
        loop = asyncio.get_running_loop()
        exit_code = await loop.run_in_executor(None, _fork_and_use, op)
        assert exit_code == 0
        op.track("parent_after")
        assert await op.flush(timeout=5)
        stats = op.stats()
    names = sorted(r.payload["name"] for r in server.requests if r.payload)
    assert names == ["from_child", "parent_after", "parent_before", "parent_pending"]
    child = next(r for r in server.requests if r.payload and r.payload["name"] == "from_child")
    assert child.properties["pid"] != os.getpid()
    assert (stats.accepted, stats.delivered) == (3, 3)


SCRIPT_HEAD = """
import asyncio, logging, sys
from openpanel_async import OpenPanel, SyncOpenPanel
logging.basicConfig(level=logging.INFO, format="%(message)s")
op = {cls}(client_id={cid!r}, client_secret={secret!r}, api_url={url!r},
           shutdown_timeout=2.0{extra})
"""

_TRACK_FIVE = """
for i in range(5):
    op.track("script", {"i": i})
"""
_TRACK_FIVE_IN_A_LOOP = """
async def main():
    for i in range(5):
        op.track("script", {"i": i})
asyncio.run(main())
"""
# A sync app that runs an event loop in a daemon thread: it is still running at exit.
_TRACK_FIVE_ON_A_DAEMON_LOOP = """
import threading
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
async def main():
    for i in range(5):
        op.track("script", {"i": i})
asyncio.run_coroutine_threadsafe(main(), loop).result()
"""
# scenario: (client class, extra options, what the script does before it exits)
SCRIPTS = {
    "loop_in_a_daemon_thread": ("OpenPanel", "", _TRACK_FIVE_ON_A_DAEMON_LOOP),
    "no_loop": ("OpenPanel", "", _TRACK_FIVE),
    "loop_ended": ("OpenPanel", "", _TRACK_FIVE_IN_A_LOOP),
    "thread_delivery": ("OpenPanel", ", delivery='thread'", _TRACK_FIVE_IN_A_LOOP),
    "sync_client": ("SyncOpenPanel", "", _TRACK_FIVE),
}


async def run_script(code: str) -> tuple[int, str, str]:
    """Run ``code`` in a new interpreter: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def worker_thread_script(url: str, app: str) -> str:
    """A script whose client is used by ``app`` (the body of an ``async def app()``), run
    with asyncio.run() in a worker thread that is not a daemon; the main thread returns
    once the app has set ``ready``."""
    head = SCRIPT_HEAD.format(
        cls="OpenPanel", cid=CLIENT_ID, secret=CLIENT_SECRET, url=url, extra=""
    )
    return head + textwrap.dedent(
        """
        import threading, time
        ready = threading.Event()
        def worker():
            async def app():
        {app}
            asyncio.run(app())
        threading.Thread(target=worker).start()
        ready.wait()
        """
    ).format(app=textwrap.indent(textwrap.dedent(app).strip("\n"), " " * 8))


@pytest.mark.parametrize("scenario", sorted(SCRIPTS))
async def test_forgotten_close_delivers_at_exit(server: LocalOpenPanel, scenario: str) -> None:
    cls, extra, body = SCRIPTS[scenario]
    # Slow answers: events a delivery thread has already sent are still pending at exit.
    server.script(*[Reply(delay=0.3)] * 5)
    # A host name, not an IP: at exit it must still be resolved (in the loop's executor).
    url = server.url.replace("127.0.0.1", "localhost")
    code = SCRIPT_HEAD.format(cls=cls, cid=CLIENT_ID, secret=CLIENT_SECRET, url=url, extra=extra)
    code += textwrap.dedent(body)
    status, _, text = await run_script(code)
    assert status == 0, text
    assert sorted(r.properties["i"] for r in server.requests) == [0, 1, 2, 3, 4]
    assert "client not closed at exit; delivering" in text
    assert "5 delivered, 0 failed" in text
    assert CLIENT_SECRET not in text


async def test_at_exit_a_client_of_a_thread_still_running_is_left_to_it(
    server: LocalOpenPanel,
) -> None:
    # Exit hooks run before the threads that are not daemons are joined: the main thread
    # returns while a worker thread's own app still tracks. That thread owns its client's
    # shutdown; the exit hook must neither close nor flush it.
    app = """
        async with op:
            ready.set()
            kept = sum(op.track("tick", {"i": i}) for i in range(3))
            for i in range(3, 10):
                await asyncio.sleep(0.05)  # the main thread has returned by now
                kept += op.track("tick", {"i": i})
            print("kept", kept, flush=True)
    """
    status, stdout, text = await run_script(worker_thread_script(server.url, app))
    assert status == 0, text
    assert stdout.split() == ["kept", "10"]
    assert sorted(r.properties["i"] for r in server.requests) == list(range(10))
    assert "client not closed at exit" not in text


async def test_at_exit_a_thread_that_forgot_its_client_gets_a_second_look(
    server: LocalOpenPanel,
) -> None:
    # The worker thread (not a daemon) is still busy when the exit hook runs, so the hook
    # leaves its client to it; then its loop ends without aclose(). A second look, after
    # the join, delivers what it left behind.
    app = """
        for i in range(5):
            op.track("tick", {"i": i})
        ready.set()
        time.sleep(0.3)  # blocking work while the interpreter starts to exit
    """
    status, _, text = await run_script(worker_thread_script(server.url, app))
    assert status == 0, text
    assert sorted(r.properties["i"] for r in server.requests) == [0, 1, 2, 3, 4]
    assert "client not closed at exit; delivering 5 pending events" in text
    assert "5 delivered, 0 failed" in text


async def test_at_exit_a_stuck_loop_in_a_daemon_thread_costs_a_bounded_wait(
    server: LocalOpenPanel,
) -> None:
    # The loop's thread is blocked by the application's own code: the drain cannot run.
    # Exit waits shutdown_timeout (plus a grace) at most, and says what was lost.
    code = SCRIPT_HEAD.format(
        cls="OpenPanel", cid=CLIENT_ID, secret=CLIENT_SECRET, url=server.url, extra=""
    ).replace("shutdown_timeout=2.0", "shutdown_timeout=0.1")
    code += textwrap.dedent(_TRACK_FIVE_ON_A_DAEMON_LOOP)
    code += "import time\nloop.call_soon_threadsafe(time.sleep, 60)\ntime.sleep(0.1)\n"
    started = time.monotonic()
    status, _, text = await run_script(code)
    took = time.monotonic() - started
    assert status == 0, text
    assert "5 events pending at exit were lost" in text
    assert took < 0.1 + _EXIT_GRACE + 5.0  # the interpreter's own start and stop included
    assert CLIENT_SECRET not in text


def test_garbage_collected_unclosed_client_warns() -> None:
    op = OpenPanel(client_id=CLIENT_ID, api_url="http://127.0.0.1:9")
    for _ in range(3):
        op.track("orphan")  # no loop in this thread: the events wait in the queue
    # The warning comes from the finaliser, at the `del` itself (no reference cycle).
    with pytest.warns(ResourceWarning, match="unclosed OpenPanel client with 3 pending events"):  # noqa: PT031
        del op
        gc.collect()


def test_closed_or_empty_client_does_not_warn() -> None:
    op = OpenPanel(client_id=CLIENT_ID)
    del op
    gc.collect()  # filterwarnings=error: any warning here fails the test


def test_client_outlives_its_event_loop() -> None:
    """asyncio.run() ending without aclose(): the next loop that uses the client sends it all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    op = OpenPanel(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        api_url=f"http://127.0.0.1:{port}",
        retry=FAST_RETRY,
        shutdown_timeout=2.0,
    )

    async def first_loop() -> None:
        async with LocalOpenPanel(port=port) as srv:
            srv.script(*[Reply(hang=True)] * 3)
            for i in range(3):
                op.track("first", {"i": i})
            await srv.wait_for_requests(0)
            await asyncio.sleep(0.05)  # all three hang in flight on the server
        # The loop ends with the events unsettled and without aclose().

    asyncio.run(first_loop())
    assert op.stats().state == "stopped"
    assert op.stats().pending == 3

    async def second_loop() -> list[str]:
        async with LocalOpenPanel(port=port, client_secret=CLIENT_SECRET) as srv:
            op.track("second")
            assert await op.flush(timeout=5)
            await op.aclose()
            return sorted(
                f"{(r.payload or {})['name']}{r.properties.get('i', '')}" for r in srv.events
            )

    assert asyncio.run(second_loop()) == ["first0", "first1", "first2", "second"]
    stats = op.stats()
    assert (stats.accepted, stats.delivered, stats.pending) == (4, 4, 0)


def test_the_next_loop_wakes_for_events_from_threads() -> None:
    """After a loop ended without aclose(), the next loop's sender wakes for each new event
    (the old sender's wake-up bookkeeping must not leak into the new one's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    op = OpenPanel(client_id=CLIENT_ID, api_url=f"http://127.0.0.1:{port}", retry=FAST_RETRY)

    async def first_loop() -> None:
        async with LocalOpenPanel(port=port):
            op.track("first")
            assert await op.flush(timeout=5)
        # The loop ends without aclose().

    asyncio.run(first_loop())

    async def second_loop() -> list[str]:
        async with LocalOpenPanel(port=port) as srv:
            await op.start()
            for i in range(3):
                await asyncio.to_thread(op.track, "threaded", {"i": i})
                async with asyncio.timeout(5):  # no flush(): the wake-up alone must do it
                    while len(srv.events) <= i:
                        await asyncio.sleep(0.001)
            await op.aclose()
            return [f"{(r.payload or {})['name']}{r.properties['i']}" for r in srv.events]

    assert asyncio.run(second_loop()) == ["threaded0", "threaded1", "threaded2"]
