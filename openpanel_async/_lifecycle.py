"""Process-level events a client must survive: ``os.fork()`` and interpreter exit.

Clients register here; the hooks are installed once, on the first registration.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Protocol


class _ProcessAware(Protocol):
    def _reset_after_fork(self) -> None: ...

    def _last_chance(self) -> None: ...


_clients: weakref.WeakSet[_ProcessAware] = weakref.WeakSet()
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
            atexit.register(_at_exit)
            _installed = True


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._reset_after_fork()


def _at_exit() -> None:
    for client in list(_clients):
        client._last_chance()
