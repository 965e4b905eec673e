"""The client for code without an event loop: Django, Flask, scripts, Celery tasks.

``SyncOpenPanel`` is ``OpenPanel(delivery="thread")`` with a blocking API: the engine runs
on a private daemon thread with its own event loop. The event methods are the async
client's own (thread-safe, never blocking); ``flush()``, ``send()`` and ``close()`` block
the calling thread, each with a deadline. The thread starts on first use, so a client
created before ``os.fork()`` (gunicorn ``--preload``, Celery prefork) starts its own thread
in each child. At interpreter exit an unclosed client delivers what it holds, within its
``shutdown_timeout``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from ._accumulator import DROP_CLOSED
from ._client import OpenPanel
from ._events import Event
from ._stats import Stats
from ._thread import GRACE, DeliveryThread, ThreadStopped
from .errors import ClientClosedError, ConfigError


class SyncOpenPanel:
    """A blocking-API client; takes the same arguments as :class:`OpenPanel`.

    ``track()``, ``identify()``, ``increment()``, ``decrement()``, ``group()``,
    ``assign_group()`` and ``send_nowait()`` behave exactly as on ``OpenPanel``: they never
    block and may be called from any thread.
    """

    def __init__(self, **options: Any) -> None:
        if options.get("delivery", "thread") != "thread":
            raise ConfigError("delivery: SyncOpenPanel always delivers on its own thread")
        options["delivery"] = "thread"
        self._client = OpenPanel(**options)
        runner = self._client._runner
        assert runner is not None
        self._runner: DeliveryThread = runner
        self._shutdown_timeout: float = self._client._shutdown_timeout
        # The event methods are the async client's, bound: no wrapper on the hot path.
        client = self._client
        self.track = client.track
        self.identify = client.identify
        self.increment = client.increment
        self.decrement = client.decrement
        self.group = client.group
        self.assign_group = client.assign_group
        self.send_nowait = client.send_nowait
        self.set_global_properties = client.set_global_properties

    def __repr__(self) -> str:
        return f"<SyncOpenPanel {self._client!r}>"

    def send(
        self,
        event: Event,
        *,
        timeout: float | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """Queue ``event``, blocking until there is room (see ``OpenPanel.send``)."""
        client = self._client
        # Prepared here, on the calling thread, so that its event context applies.
        item = client._prepare(event, client_ip, user_agent)
        if item is None or client._put_at_once(item):
            return
        try:
            self._runner.run_blocking(client._put_when_room(item, timeout), timeout)
        except ThreadStopped:
            client._acc.count_drop(DROP_CLOSED)  # closed before it could wait
            raise

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event accepted so far is settled; False on timeout."""
        if not self._runner.started or self._runner.stopped:
            return self._client.stats().pending == 0
        try:
            return self._runner.run_blocking(self._client.flush(timeout), timeout)
        except ClientClosedError:
            return self._client.stats().pending == 0  # closed meanwhile: all is settled

    def stats(self) -> Stats:
        return self._client.stats()

    def close(self) -> None:
        """Deliver what is pending within ``shutdown_timeout``, then stop the thread.

        Idempotent. Never blocks much longer than ``shutdown_timeout``.
        """
        runner = self._runner
        if runner.on_own_thread():
            # From on_error, say: it would wait for itself. Refused before anything is
            # stopped, so the client stays usable and a later close() drains it.
            raise RuntimeError(
                "SyncOpenPanel.close() cannot be called from the delivery thread (an "
                "on_error callback, say); call it from your own code"
            )
        if runner.stopped:
            runner.join_blocking(self._shutdown_timeout + 2 * GRACE)  # another close() drains
            return
        if not runner.started and self._client._close_unstarted(runner):
            return
        try:
            # aclose() may use the drain timeout plus a second each to stop the workers and
            # to close the transport: allow for both before giving up on the thread.
            runner.run_blocking(self._client.aclose(), self._shutdown_timeout + 2 * GRACE)
        except ClientClosedError:
            pass  # another close() stopped the thread first
        finally:
            runner.stop()
            runner.join_blocking(GRACE)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
