"""Every exception openpanel-async raises or reports.

The tree::

    OpenPanelError
    ├── ConfigError             (also a ValueError)  bad constructor argument
    ├── InvalidEventError       (also a ValueError)  bad event, raised at the call site
    ├── ClientClosedError       (also a RuntimeError) the client no longer accepts events
    ├── SendTimeoutError        (also a TimeoutError) ``send()`` found no room in time
    └── DeliveryError                                an accepted event was not delivered;
        │                                            never raised, passed to ``on_error``
        ├── RejectedError        the server refused the event (4xx); not retried
        │   └── AuthenticationError   401: the credentials were refused
        ├── DroppedByServerError 202: the server took the request but dropped the event
        ├── RetriesExhaustedError    retryable failures until the retry policy gave up
        └── ShutdownError        still pending when ``aclose()`` ran out of time

No message, ``repr`` or attribute of these exceptions carries the client secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._events import Event

__all__ = [
    "AuthenticationError",
    "ClientClosedError",
    "ConfigError",
    "DeliveryError",
    "DroppedByServerError",
    "InvalidEventError",
    "OpenPanelError",
    "RejectedError",
    "RetriesExhaustedError",
    "SendTimeoutError",
    "ShutdownError",
]


class OpenPanelError(Exception):
    """Base class of every openpanel-async exception."""


class ConfigError(OpenPanelError, ValueError):
    """A constructor argument of the client or of a policy object is invalid."""


class InvalidEventError(OpenPanelError, ValueError):
    """An event breaks a rule of the wire contract; raised where it was built, nothing queued."""


class ClientClosedError(OpenPanelError, RuntimeError):
    """The client is closed (or closing) and accepts no more events."""


class SendTimeoutError(OpenPanelError, TimeoutError):
    """``await send(event, timeout=...)`` found no room in the queue before the timeout."""


class DeliveryError(OpenPanelError):
    """An accepted event finally failed.

    Passed to the ``on_error`` callback, one per event, never raised into the code that
    tracked the event.

    Attributes:
        event_type: the wire type (``"track"``, ``"identify"``, ...).
        body: the exact JSON body that was (or would have been) sent.
        reason: a short, stable machine-readable reason (``"rejected"``, ``"unauthorized"``,
            ``"bot"``, ``"retries_exhausted"``, ``"shutdown"``, ``"internal"``).
        status: the last HTTP status received, or ``None`` when no response came.
        server_message: the server's message from the last response body, if any.
        cause: the last network error, if the last attempt failed without a response.
        attempts: how many requests were made for this event.
    """

    def __init__(
        self,
        message: str,
        *,
        event_type: str,
        body: bytes,
        reason: str,
        attempts: int,
        status: int | None = None,
        server_message: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.body = body
        self.reason = reason
        self.attempts = attempts
        self.status = status
        self.server_message = server_message
        self.cause = cause

    @property
    def event(self) -> Event:
        """The event that failed, decoded back from its body."""
        from ._events import decode_event

        return decode_event(self.body)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, event_type={self.event_type!r}, "
            f"reason={self.reason!r}, status={self.status!r}, attempts={self.attempts})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ arguments need help to survive pickling (multiprocessing).
        return (_rebuild_delivery_error, (type(self), str(self), self.__dict__))


def _rebuild_delivery_error(
    cls: type[DeliveryError], message: str, state: dict[str, Any]
) -> DeliveryError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class RejectedError(DeliveryError):
    """The server refused the event (400, 401, 404, 413, 415, ...): retrying cannot help."""


class AuthenticationError(RejectedError):
    """The server refused the credentials (401)."""


class DroppedByServerError(DeliveryError):
    """The server answered 202: it classified the user agent as a bot and dropped the event."""


class RetriesExhaustedError(DeliveryError):
    """Every attempt failed with a retryable error until the retry policy gave up."""


class ShutdownError(DeliveryError):
    """The event was still pending when the client closed and its deadline ran out."""
