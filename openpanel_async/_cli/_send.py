"""``openpanel-async send TYPE ...``: one event, built from the options, delivered or refused."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from .._client import OpenPanel
from .._events import (
    UNSET,
    AssignGroup,
    Decrement,
    Event,
    Group,
    Identify,
    Increment,
    Track,
    encode_event,
    stamp_track,
)
from .._retry import RetryPolicy
from ..errors import DeliveryError, InvalidEventError
from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    describe_failure,
    make_client,
    resolve_target,
)

# A one-off command must fail fast against a dead server rather than retry for minutes.
SEND_RETRY = RetryPolicy(
    max_attempts=3,
    wait_initial=0.2,
    wait_max=1.0,
    wait_jitter=0.25,
    max_elapsed=15.0,
    max_retry_after=10.0,
)


def _properties(args: argparse.Namespace) -> Any:
    """The --prop pairs as a dict, or UNSET: an optional field is left out, never null."""
    pairs: list[tuple[str, Any]] | None = args.props
    return dict(pairs) if pairs else UNSET


def _optional(value: str | None) -> Any:
    return UNSET if value is None else value


def build_track(args: argparse.Namespace) -> Event:
    # Stamped here rather than by the client, so that the body printed is the body sent.
    return stamp_track(
        Track(
            name=args.name,
            properties=_properties(args),
            profile_id=_optional(args.profile_id),
            groups=args.groups or UNSET,
        )
    )


def build_identify(args: argparse.Namespace) -> Event:
    return Identify(
        profile_id=args.profile_id,
        first_name=_optional(args.first_name),
        last_name=_optional(args.last_name),
        email=_optional(args.email),
        avatar=_optional(args.avatar),
        properties=_properties(args),
    )


def build_increment(args: argparse.Namespace) -> Event:
    return Increment(profile_id=args.profile_id, property=args.property, value=args.value)


def build_decrement(args: argparse.Namespace) -> Event:
    return Decrement(profile_id=args.profile_id, property=args.property, value=args.value)


def build_group(args: argparse.Namespace) -> Event:
    return Group(id=args.id, type=args.type, name=args.name, properties=_properties(args))


def build_assign_group(args: argparse.Namespace) -> Event:
    return AssignGroup(group_ids=args.group_ids, profile_id=_optional(args.profile_id))


def cmd_send(args: argparse.Namespace) -> int:
    target = resolve_target(args, "send")
    build: Callable[[argparse.Namespace], Event] = args.build
    try:
        event = build(args)
    except InvalidEventError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    failures: list[DeliveryError] = []
    client = make_client(
        target,
        on_error=failures.append,
        retry=SEND_RETRY,
        request_timeout=args.timeout,
        # Room for every attempt to time out, and the backoff between them.
        shutdown_timeout=SEND_RETRY.max_attempts * args.timeout + 2.0,
    )
    asyncio.run(_send_one(client, event, args.ip, args.user_agent))
    if failures:
        raise CliError(describe_failure(failures[0]), EXIT_FAILURE)
    if client.stats().delivered != 1:  # cannot happen: every accepted event settles
        raise CliError("the event was not delivered", EXIT_FAILURE)
    # The client does not expose the success status or body: 2xx other than 202 is all
    # that "delivered" tells us.
    print(f"delivered: {encode_event(event).decode()}", flush=True)
    return EXIT_OK


async def _send_one(
    client: OpenPanel, event: Event, client_ip: str | None, user_agent: str | None
) -> None:
    async with client:
        try:
            await client.send(event, client_ip=client_ip, user_agent=user_agent)
        except InvalidEventError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    # Leaving the block drained the queue: delivered, or failed and reported to on_error.
