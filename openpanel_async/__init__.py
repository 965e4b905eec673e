"""openpanel-async: the asyncio-native client for the OpenPanel analytics API.

Usage::

    async with OpenPanel(client_id="...", client_secret="...") as op:
        op.track("signed_up", {"plan": "pro"}, profile_id="user_123")

Everything public is importable from this package; the ``_``-prefixed modules are private.
"""

from ._client import OpenPanel
from ._context import EventContext, event_context, set_identity
from ._events import AssignGroup, Decrement, Event, Group, Identify, Increment, Track
from ._retry import RetryPolicy
from ._stats import Stats
from ._sync import SyncOpenPanel
from ._transport import Transport, TransportResponse
from ._version import __version__
from .errors import (
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    DeliveryError,
    DroppedByServerError,
    InvalidEventError,
    OpenPanelError,
    RejectedError,
    RetriesExhaustedError,
    SendTimeoutError,
    ShutdownError,
)

__all__ = [
    "AssignGroup",
    "AuthenticationError",
    "ClientClosedError",
    "ConfigError",
    "Decrement",
    "DeliveryError",
    "DroppedByServerError",
    "Event",
    "EventContext",
    "Group",
    "Identify",
    "Increment",
    "InvalidEventError",
    "OpenPanel",
    "OpenPanelError",
    "RejectedError",
    "RetriesExhaustedError",
    "RetryPolicy",
    "SendTimeoutError",
    "ShutdownError",
    "Stats",
    "SyncOpenPanel",
    "Track",
    "Transport",
    "TransportResponse",
    "__version__",
    "event_context",
    "set_identity",
]
