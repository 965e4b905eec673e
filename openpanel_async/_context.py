"""Per-request event context: the end user's IP, user agent, profile and groups.

A web app tracks events about the user of the current request. The ASGI middleware (or
:func:`event_context`) stores that user's details in a context variable, so every event
tracked while handling the request, in background tasks it starts too, carries them without
arguments. Context variables are per task: two concurrent requests never see each other's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from . import _validation
from ._events import ProfileId

__all__ = ["EventContext", "current_context", "event_context", "set_identity"]


@dataclass(slots=True)
class EventContext:
    """What the client adds to events tracked in the current context.

    Explicit arguments to ``track()`` and friends always win over these values.
    """

    client_ip: str | None = None
    user_agent: str | None = None
    profile_id: ProfileId | None = None
    groups: list[str] | None = None
    # Made by the middleware for one request: set_identity() may update it in place, so
    # that sync dependencies (run in a thread with a copied context) are seen too.
    request_scoped: bool = field(default=False, repr=False)


_current: ContextVar[EventContext | None] = ContextVar("openpanel_event_context", default=None)


def current_context() -> EventContext | None:
    """The context events tracked here would use, or None."""
    return _current.get()


def _checked(
    client_ip: str | None,
    user_agent: str | None,
    profile_id: ProfileId | None,
    groups: Sequence[str] | None,
) -> list[str] | None:
    if profile_id is not None:
        _validation.check_profile_id(profile_id, "profile_id")
    if groups is None:
        return None
    _validation.check_string_list(groups, "groups", allow_empty_list=True)
    return list(groups)


@contextmanager
def event_context(
    *,
    client_ip: str | None = None,
    user_agent: str | None = None,
    profile_id: ProfileId | None = None,
    groups: Sequence[str] | None = None,
) -> Iterator[EventContext]:
    """Add these details to every event tracked inside the ``with`` block.

    Nests: values given here override the enclosing context's, the others are inherited.
    """
    checked_groups = _checked(client_ip, user_agent, profile_id, groups)
    outer = _current.get()
    context = EventContext() if outer is None else replace(outer, request_scoped=False)
    if client_ip is not None:
        context.client_ip = client_ip
    if user_agent is not None:
        context.user_agent = user_agent
    if profile_id is not None:
        context.profile_id = profile_id
    if checked_groups is not None:
        context.groups = checked_groups
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def set_identity(profile_id: ProfileId | None = None, groups: Sequence[str] | None = None) -> None:
    """Set the profile (and groups) for the rest of the current request.

    Inside a request handled by the middleware this updates that request's own context,
    so it works from a FastAPI dependency, sync or async, and is seen by everything the
    request runs afterwards. Elsewhere it applies to the current task (or thread) from now
    on, and never to the task that started it or to its siblings.
    """
    checked_groups = _checked(None, None, profile_id, groups)
    context = _current.get()
    if context is None or not context.request_scoped:
        context = EventContext() if context is None else replace(context)
        _current.set(context)
    if profile_id is not None:
        context.profile_id = profile_id
    if checked_groups is not None:
        context.groups = checked_groups


def enter_request(client_ip: str | None, user_agent: str | None) -> object:
    """For the middleware: a fresh context for one request; returns the reset token."""
    return _current.set(
        EventContext(client_ip=client_ip, user_agent=user_agent, request_scoped=True)
    )


def exit_request(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
