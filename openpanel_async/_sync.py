"""The client for code without an event loop: Django, Flask, scripts, Celery tasks.

``SyncOpenPanel`` runs the same engine as ``OpenPanel`` on a private daemon thread with
its own event loop. The event methods are the async client's own (thread-safe, never
blocking); ``flush()``, ``send()`` and ``close()`` block the calling thread, each with a
deadline. The thread starts on first use, so a client created before ``os.fork()`` (gunicorn
``--preload``, Celery prefork) starts its own thread in each child. At interpreter exit an
unclosed client is closed, within its ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from . import _lifecycle
from ._client import OpenPanel
from ._events import Event
from ._stats import Stats
from .errors import ClientClosedError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# Beyond a call's own deadline, time allowed for the loop thread to answer at all.
_GRACE = 2.0
_START_TIMEOUT = 10.0


def _delegate(
    method: Callable[Concatenate[OpenPanel, P], R],
) -> Callable[Concatenate[SyncOpenPanel, P], R]:
    """The async client's non-blocking method, starting the private thread on first use."""
    name = method.__name__

    def call(self: SyncOpenPanel, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._loop is None and not self._closed:
            self._ensure_running()
        # Once closed, the async client drops (and counts) what is sent; it never raises.
        result: R = getattr(self._client, name)(*args, **kwargs)
        return result

    functools.update_wrapper(call, method)
    return call


class SyncOpenPanel:
    """A blocking-API client; takes the same arguments as :class:`OpenPanel`.

    ``track()``, ``identify()``, ``increment()``, ``decrement()``, ``group()``,
    ``assign_group()`` and ``send_nowait()`` behave exactly as on ``OpenPanel``: they never
    block and may be called from any thread.
    """

    def __init__(self, **options: Any) -> None:
        self._client = OpenPanel(**options)
        self._shutdown_timeout: float = self._client._shutdown_timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        _lifecycle.register(self)

    def __repr__(self) -> str:
        return f"<SyncOpenPanel {self._client!r}>"

    # --- the private loop ----------------------------------------------------------------

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            if self._closed:
                raise ClientClosedError("the client is closed")
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run_loop, args=(loop, ready), name="openpanel-async", daemon=True
            )
            thread.start()
            if not ready.wait(_START_TIMEOUT):
                raise RuntimeError("the openpanel-async thread did not start")
            asyncio.run_coroutine_threadsafe(self._client.start(), loop).result(_START_TIMEOUT)
            self._thread = thread
            self._loop = loop
            return loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise ClientClosedError("the client is not running")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("blocking SyncOpenPanel calls cannot run on its own thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        return future.result(None if timeout is None else timeout + _GRACE)

    # --- the API ---------------------------------------------------------------------------

    track = _delegate(OpenPanel.track)
    identify = _delegate(OpenPanel.identify)
    increment = _delegate(OpenPanel.increment)
    decrement = _delegate(OpenPanel.decrement)
    group = _delegate(OpenPanel.group)
    assign_group = _delegate(OpenPanel.assign_group)
    send_nowait = _delegate(OpenPanel.send_nowait)
    set_global_properties = _delegate(OpenPanel.set_global_properties)

    def send(self, event: Event, *, timeout: float | None = None, **headers: str | None) -> None:
        """Queue ``event``, blocking until there is room (see ``OpenPanel.send``)."""
        self._ensure_running()
        self._call(self._client.send(event, timeout=timeout, **headers), timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event accepted so far is settled; False on timeout."""
        if self._loop is None:
            return self._client.stats().pending == 0
        return self._call(self._client.flush(timeout), timeout)

    def stats(self) -> Stats:
        return self._client.stats()

    def close(self) -> None:
        """Deliver what is pending within ``shutdown_timeout``, then stop the thread.

        Idempotent. Never blocks much longer than ``shutdown_timeout``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            # Never started: nothing can be pending (the first event starts the thread).
            asyncio.run(self._client.aclose())
            return
        try:
            # aclose() may use the drain timeout plus a second each to stop the workers and
            # to close the transport: allow for both before giving up on the thread.
            self._call(self._client.aclose(), self._shutdown_timeout + 2 * _GRACE)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_GRACE)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- process events (see _lifecycle) -----------------------------------------------------

    def _reset_after_fork(self) -> None:
        # The thread and its loop did not survive the fork; the child starts its own.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None

    def _last_chance(self) -> None:
        if not self._closed and self._loop is not None:
            self.close()
