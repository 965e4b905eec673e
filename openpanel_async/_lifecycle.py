"""Process-level events a client must survive: ``os.fork()`` and interpreter exit.

Clients register here; the hooks are installed once, on the first registration.

The exit hook must run while ``concurrent.futures`` still accepts work: a host name is
resolved in the event loop's default executor, and once that module's own exit hook has
run, every lookup (so every request to ``api.openpanel.dev``) fails. ``atexit`` handlers
run too late for that; threading's exit hooks run earlier, newest first, so ours is
registered after that module's. They also run before the threads that are not daemons are
joined: a client whose loop still runs in such a thread is left to it, and looked at again
by a plain ``atexit`` handler once it has ended (best effort: no new lookups by then).
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread
import os
import threading
import weakref
from typing import Protocol


class _ProcessAware(Protocol):
    def _reset_after_fork(self) -> None: ...

    def _last_chance(self, *, late: bool = False) -> None: ...


_clients: weakref.WeakSet[_ProcessAware] = weakref.WeakSet()
# Clients whose loop still ran in a thread that is not a daemon when the exit hook ran:
# that thread owned their shutdown, and is joined after the hook. A last look at them
# comes from a plain atexit handler, which runs after the join.
_late: weakref.WeakSet[_ProcessAware] = weakref.WeakSet()
_installed = False
_install_lock = threading.Lock()


def register(client: _ProcessAware) -> None:
    global _installed
    _clients.add(client)
    if _installed:
        return
    with _install_lock:
        if not _installed:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            atexit.register(_at_exit_late)  # runs after the early hook and the join
            _register_exit_hook()
            _installed = True


def look_again_at_exit(client: _ProcessAware) -> None:
    """Once the threads that are not daemons have ended, call ``client._last_chance``
    again (late): the thread that owned its shutdown may have left events behind."""
    _late.add(client)


def _register_exit_hook() -> None:
    assert concurrent.futures.thread  # imported above: its hook is registered before ours
    register_early = getattr(threading, "_register_atexit", None)
    try:
        if register_early is None:
            raise RuntimeError("no threading._register_atexit on this Python")
        register_early(_at_exit)
    except RuntimeError:
        atexit.register(_at_exit)  # a client created during shutdown: best effort


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._reset_after_fork()


def _at_exit() -> None:
    for client in list(_clients):
        client._last_chance()


def _at_exit_late() -> None:
    for client in list(_late):
        client._last_chance(late=True)
