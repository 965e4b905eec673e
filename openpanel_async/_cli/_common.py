"""What every command shares: exit statuses, the error they end with, credentials and the client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .._client import DEFAULT_API_URL, OpenPanel
from .._retry import RetryPolicy
from ..errors import AuthenticationError, ConfigError, DeliveryError

PROG = "openpanel-async"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C

ENV_API_URL = "OPENPANEL_API_URL"
ENV_CLIENT_ID = "OPENPANEL_CLIENT_ID"
ENV_CLIENT_SECRET = "OPENPANEL_CLIENT_SECRET"


class CliError(Exception):
    """A problem reported as one line on stderr, with the exit status to end with."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def on_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` on the loop for SIGINT and SIGTERM while the block runs.

    Where the loop cannot take signal handlers (Windows), Ctrl-C stays a KeyboardInterrupt,
    which ``main`` turns into a one-line message.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# --- credentials and the client ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where events go. ``str()`` never shows the secret."""

    api_url: str
    client_id: str
    client_secret: str | None = None

    def __str__(self) -> str:
        return f"{self.api_url} (client id {self.client_id})"


def env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_target(args: argparse.Namespace, command: str) -> Target:
    """Options first, then the environment. There is no default project."""
    client_id = args.client_id or env(ENV_CLIENT_ID)
    if not client_id:
        raise CliError(
            f"{command} needs credentials: pass --client-id (and --client-secret), or set "
            f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}",
            EXIT_USAGE,
        )
    api_url = args.api_url or env(ENV_API_URL) or DEFAULT_API_URL
    secret = args.client_secret if args.client_secret is not None else env(ENV_CLIENT_SECRET)
    return Target(api_url, client_id, secret)


_OPTION_NAMES = {
    "api_url": "--api-url",
    "client_id": "--client-id",
    "client_secret": "--client-secret",
}


def make_client(
    target: Target,
    *,
    on_error: Callable[[DeliveryError], Any],
    retry: RetryPolicy,
    request_timeout: float,
    shutdown_timeout: float,
    max_queue_size: int = 10_000,
    max_concurrency: int = 64,
) -> OpenPanel:
    try:
        return OpenPanel(
            client_id=target.client_id,
            client_secret=target.client_secret,
            api_url=target.api_url,
            retry=retry,
            on_error=on_error,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            max_queue_size=max_queue_size,
            max_concurrency=max_concurrency,
        )
    except ConfigError as exc:
        # The library names its arguments; the user typed options (or set variables).
        message = str(exc)
        field, sep, rest = message.partition(":")
        if sep and field in _OPTION_NAMES:
            message = f"{_OPTION_NAMES[field]}:{rest}"
        raise CliError(message, EXIT_USAGE) from None


def describe_failure(error: DeliveryError) -> str:
    if isinstance(error, AuthenticationError):
        return f"{error} (check the client id and secret)"
    return str(error)
