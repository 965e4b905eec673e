"""The public, frozen snapshot of a client's counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def _empty() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Counters at one instant. ``accepted == delivered + failed + pending`` always holds.

    Attributes:
        accepted: events taken into the queue.
        delivered: events the server stored (2xx other than 202).
        failed: accepted events that will never be delivered (see ``failed_by_reason``).
        dropped: events refused at the call site without being accepted (queue full, client
            closed, ...; see ``dropped_by_reason``). Not part of ``accepted``.
        retries: requests re-sent after a failed attempt (429s included).
        rate_limited: 429 responses received.
        pending: accepted and not yet settled: queued, in flight or waiting for a retry.
        in_flight: requests on the wire right now.
        concurrency: requests allowed in flight right now.
        paused_for: seconds left in a pause the server asked for (0.0 when not paused).
        state: ``"new"``, ``"running"``, ``"closing"``, ``"closed"``, ``"unauthorized"``
            or ``"broken"``.
    """

    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    rate_limited: int = 0
    pending: int = 0
    in_flight: int = 0
    concurrency: int = 0
    paused_for: float = 0.0
    state: str = "new"
    dropped_by_reason: Mapping[str, int] = field(default_factory=_empty)
    failed_by_reason: Mapping[str, int] = field(default_factory=_empty)
