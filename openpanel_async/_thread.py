"""A private daemon thread running an event loop: where delivery runs off the caller's loop.

Used by ``OpenPanel(delivery="thread")`` and by ``SyncOpenPanel``. The caller's side only
queues events (thread-safe, never blocking); the sender, its HTTP connections and its
retries live on this thread's loop, so they cost the caller's event loop nothing. Work is
handed over with ``call_soon_threadsafe`` / ``run_coroutine_threadsafe``, each wait with
a deadline. After ``os.fork()`` the child forgets the parent's thread and starts its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ClientClosedError

T = TypeVar("T")


class ThreadStopped(ClientClosedError):
    """The delivery thread stopped before a call handed to it could run or finish."""


# Starting the thread and handing it one call take a millisecond; this only bounds a wait
# on a machine that is badly overloaded.
START_TIMEOUT = 10.0
# Beyond a call's own deadline, time allowed for the loop thread to answer at all.
GRACE = 2.0


class DeliveryThread:
    """One client's delivery thread and its event loop; started on first use, stopped once."""

    def __init__(self, name: str = "openpanel-async") -> None:
        self._name = name
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._finished: concurrent.futures.Future[None] | None = None
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running" if self.loop else "new"
        return f"<DeliveryThread {self._name} {state}>"

    @property
    def started(self) -> bool:
        return self.loop is not None

    @property
    def stopped(self) -> bool:
        return self._stopped

    def on_own_thread(self) -> bool:
        return self.thread is not None and threading.current_thread() is self.thread

    def ensure_started(self) -> asyncio.AbstractEventLoop:
        """The thread's loop, starting the thread on first use."""
        loop = self.loop
        if loop is not None and not self._stopped:
            return loop
        with self._lock:
            if self._stopped:
                raise ThreadStopped("the client is closed")
            if self.loop is not None:
                return self.loop
            loop = _new_event_loop()
            finished: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._run, args=(loop, finished), name=self._name, daemon=True
            )
            self.thread, self._finished = thread, finished
            # No need to wait for the loop to run: what is scheduled on it before then
            # runs as soon as it does.
            thread.start()
            self.loop = loop
            return loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, finished: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                # Work handed over just before stop() must not be left pending forever:
                # cancel it (its callers see ClientClosedError), as asyncio.run() does.
                leftovers = asyncio.all_tasks(loop)
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.wait(leftovers, timeout=GRACE))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                finished.set_result(None)

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the thread's loop and return its result (blocking briefly)."""
        loop = self.ensure_started()
        if self.on_own_thread():
            return function()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        with self._lock:
            if self._stopped:
                raise ThreadStopped("the client is closed")
            loop.call_soon_threadsafe(run)
        return result.result(START_TIMEOUT)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the thread's loop; its result as a thread-safe future."""
        try:
            loop = self.ensure_started()
            # Under the lock, so that stop() cannot come between the check and the hand-over:
            # whatever is handed over before stop() runs, or is cancelled when the loop ends.
            with self._lock:
                if self._stopped:
                    raise ThreadStopped("the client is closed")
                return asyncio.run_coroutine_threadsafe(coroutine, loop)
        except BaseException:
            coroutine.close()
            raise

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` run on the thread's loop, from any other event loop.

        ClientClosedError if the thread stopped before it could finish.
        """
        if self.on_own_thread():
            return await coroutine
        return await self.wait(self.submit(coroutine))

    async def wait(self, future: concurrent.futures.Future[T], *, detached: bool = False) -> T:
        """Await a future of this thread's; ClientClosedError if its loop ended first.

        ``detached``: cancelling the waiter (say, because the caller's loop is shutting
        down) does not cancel the work on this thread, which runs to its end.
        """
        watched = _mirror(future) if detached else future
        try:
            return await asyncio.wrap_future(watched)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and (task is None or not task.cancelling()):
                raise ThreadStopped("the client closed before the call completed") from None
            raise

    def run_blocking(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coroutine`` on the thread's loop, blocking the calling thread for its result."""
        if self.on_own_thread():
            coroutine.close()
            raise RuntimeError("a blocking call cannot be made from the delivery thread")
        future = self.submit(coroutine)
        try:
            return future.result(None if timeout is None else timeout + GRACE)
        except concurrent.futures.CancelledError:
            raise ThreadStopped("the client closed before the call completed") from None

    def stop_if_unstarted(self) -> bool:
        """Stop a thread that never started, atomically with respect to starting it.

        False: it had started (the caller must drain it before stopping it).
        """
        with self._lock:
            if self.loop is not None:
                return False
            self._stopped = True
            return True

    def join_blocking(self, timeout: float) -> None:
        """Block until the thread has ended (at most ``timeout`` seconds)."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stop(self) -> concurrent.futures.Future[None] | None:
        """Stop the loop and let the thread end; the future completes when it has.

        Idempotent. Never started: None.
        """
        with self._lock:
            first = not self._stopped
            self._stopped = True
            loop, finished = self.loop, self._finished
        if loop is None or finished is None:
            return None
        if first:
            # Once only: a second loop.stop() would also cut short the clean-up in _run().
            loop.call_soon_threadsafe(loop.stop)
        return finished

    async def join(self, timeout: float) -> bool:
        """Wait (without blocking the caller's loop) until the thread has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        finished = self._finished
        if finished is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(asyncio.wrap_future(finished))
            except TimeoutError:
                return False
        # finished is set in the thread's last moments; the thread itself ends just after.
        thread = self.thread
        while thread is not None and thread.is_alive():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.001)
        return True

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's thread did not survive; start afresh on use."""
        self._lock = threading.Lock()
        self.loop = None
        self.thread = None
        self._finished = None


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (the ``uvloop`` extra), else asyncio's.

    This loop is ours, so we pick the faster one: less CPU per event on this thread also
    means less time holding the GIL that the caller's thread needs.
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _mirror(future: concurrent.futures.Future[T]) -> concurrent.futures.Future[T]:
    """A future that completes like ``future``; cancelling it leaves ``future`` alone."""
    mirror: concurrent.futures.Future[T] = concurrent.futures.Future()

    def relay(done: concurrent.futures.Future[T]) -> None:
        if mirror.done():
            return  # cancelled by its waiter: nobody wants the outcome any more
        try:
            if done.cancelled():
                mirror.cancel()
            elif (exc := done.exception()) is not None:
                mirror.set_exception(exc)
            else:
                mirror.set_result(done.result())
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its waiter meanwhile

    future.add_done_callback(relay)
    return mirror
