"""Open a TCP socket to the first of a host's addresses that answers (RFC 8305, simplified).

A host name often resolves to several addresses, IPv6 and IPv4. Tried one after another,
an address that silently drops packets (a broken IPv6 route is the usual case) holds every
new connection until the request times out. So the attempts are staggered instead: the
next address is tried when the previous attempt fails, or after ``delay`` seconds while it
is still pending, and the first socket to connect wins; the others are cancelled or
closed. Families alternate, starting with the one the resolver put first.

The builtin transport uses this on every event loop. asyncio's own ``happy_eyeballs_delay``
would do on its default loop, but uvloop (which the delivery thread uses when installed)
has no such option.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from itertools import zip_longest
from typing import Any, Final

__all__ = ["DELAY", "connect_first"]

# RFC 8305 recommends 250 ms between attempts.
DELAY: Final = 0.25

_AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr)


async def connect_first(
    loop: asyncio.AbstractEventLoop, host: str, port: int, delay: float = DELAY
) -> socket.socket:
    """A connected non-blocking socket to ``host``; OSError when no address answers."""
    infos = _literal(host, port)
    if infos is None:
        # A name: resolved in the loop's executor (a thread), once per new connection.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}, {port}) returned no addresses")
    addresses = _interleave(infos)
    pending: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    try:
        for info in addresses:
            pending.add(loop.create_task(_connect(loop, info)))
            # The next address starts when this wait ends without a winner: an attempt
            # failed, or the delay passed with the attempts still pending.
            done, _ = await asyncio.wait(
                pending, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
            winner = _collect(done, pending, errors)
            if winner is not None:
                return winner
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winner = _collect(done, pending, errors)
            if winner is not None:
                return winner
    finally:
        # Losers, or every attempt when we were cancelled (the request's deadline).
        for task in pending:
            task.cancel()
            task.add_done_callback(_close_if_connected)
    if len(errors) == 1:
        raise errors[0]
    raise OSError(
        f"could not connect to any of the {len(addresses)} addresses of {host!r}: "
        + "; ".join(str(error) for error in errors)
    )


def _literal(host: str, port: int) -> list[_AddrInfo] | None:
    """The one address of an IP literal, with no lookup (None: ``host`` is a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]


def _interleave(infos: Sequence[_AddrInfo]) -> list[_AddrInfo]:
    first_family = infos[0][0]
    first = [info for info in infos if info[0] == first_family]
    others = [info for info in infos if info[0] != first_family]
    return [info for pair in zip_longest(first, others) for info in pair if info is not None]


async def _connect(loop: asyncio.AbstractEventLoop, info: _AddrInfo) -> socket.socket:
    family, type_, proto, _, address = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _collect(
    done: set[asyncio.Task[socket.socket]],
    pending: set[asyncio.Task[socket.socket]],
    errors: list[BaseException],
) -> socket.socket | None:
    """The first connected socket among ``done`` (extra ones are closed); failures noted."""
    winner = None
    for task in done:
        pending.discard(task)
        if task.cancelled():  # only ever by us, in connect_first's finally; to be safe
            continue
        error = task.exception()
        if error is not None:
            errors.append(error)
        elif winner is None:
            winner = task.result()
        else:
            task.result().close()  # two connected in the same loop iteration
    return winner


def _close_if_connected(task: asyncio.Task[socket.socket]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
