"""The argument parser: every command and option, and the types that check option values."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from .._client import DEFAULT_API_URL
from .._events import Event
from .._version import __version__
from ._common import ENV_API_URL, ENV_CLIENT_ID, ENV_CLIENT_SECRET, EXIT_USAGE, PROG
from ._demo import cmd_demo
from ._import import cmd_import
from ._send import (
    build_assign_group,
    build_decrement,
    build_group,
    build_identify,
    build_increment,
    build_track,
    cmd_send,
)
from ._serve import cmd_serve

_N = TypeVar("_N", int, float)

# --- argument types ------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A --prop value: JSON when it parses (numbers, true, null, objects...), else the text.

    NaN and Infinity are not JSON and the server refuses them: they stay strings, and so
    does a number too large for a double (``1e999``, which would parse as infinity).
    """

    def refuse(constant: str) -> NoReturn:
        raise ValueError(constant)

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(number)
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError:
        return text


def parse_property(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def parse_rate(text: str) -> tuple[int, float]:
    """``100/s``, ``100/10s``, ``600/min`` or ``100`` (per second) -> (requests, seconds)."""
    match = re.fullmatch(
        r"\s*(\d+)\s*(?:/\s*(\d+(?:\.\d+)?|\.\d+)?\s*(s|sec|m|min)?)?\s*", text, re.IGNORECASE
    )
    # A "/" must be followed by a window ("100/" is a typo, not "per second").
    incomplete = match is not None and "/" in text and not (match.group(2) or match.group(3))
    if match is None or incomplete or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected REQUESTS/s such as 100/s, 100/10s or 600/min, got {text!r}"
        )
    count, amount, unit = match.groups()
    window = float(amount) if amount else 1.0
    if unit and unit.lower().startswith("m"):
        window *= 60.0
    if window <= 0:
        raise argparse.ArgumentTypeError(f"the window must be longer than 0, got {text!r}")
    return int(count), window


def _checked(
    text: str, convert: Callable[[str], _N], expected: str, valid: Callable[[_N], bool], must: str
) -> _N:
    """``text`` converted; else an error saying what was ``expected``, or what it ``must`` be."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{must}, got {text!r}")
    return value


def _fraction(text: str) -> float:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def parse_fraction(text: str) -> float:
    """``0.1`` or ``10%`` -> 0.1."""
    return _checked(
        text,
        _fraction,
        "a fraction such as 0.1 or 10%",
        lambda value: 0.0 <= value <= 1.0,
        "must be between 0 and 1 (0% and 100%)",
    )


def _positive_float(text: str) -> float:
    return _checked(
        text, float, "a number", lambda value: 0 < value < float("inf"), "must be greater than 0"
    )


def _non_negative_float(text: str) -> float:
    return _checked(
        text, float, "a number", lambda value: 0 <= value < float("inf"), "must be 0 or more"
    )


def _positive_int(text: str) -> int:
    return _checked(text, int, "a whole number", lambda value: value >= 1, "must be at least 1")


def _port(text: str) -> int:
    return _checked(
        text,
        int,
        "a port number",
        lambda value: 0 <= value <= 65535,
        "must be between 0 and 65535",
    )


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# --- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line rather than argparse's usage block: the usage is one --help away.
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's parser must not reset to False a -v given before its name
    # (argparse copies every default of a subparser over the parent's values).
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show the client library's log",
    )


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    _add_verbose(common)
    return common


def _credential_options() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("where to send")
    group.add_argument(
        "--api-url",
        metavar="URL",
        help=f"the OpenPanel API (default: ${ENV_API_URL}, else {DEFAULT_API_URL})",
    )
    group.add_argument("--client-id", metavar="ID", help=f"default: ${ENV_CLIENT_ID}")
    group.add_argument(
        "--client-secret",
        metavar="SECRET",
        help=f"default: ${ENV_CLIENT_SECRET}; prefer the variable, a command line is visible "
        "to other users",
    )
    return parent


def _add_timeout(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default,
        metavar="SECONDS",
        help="give up on one request after this long (default: %(default)s)",
    )


def _add_send_parsers(commands: Any, common: _Parser, credentials: _Parser) -> None:
    send = commands.add_parser(
        "send",
        help="send one event and print the server's answer",
        description="Send one event, like the curl examples of the API guide. Exits 0 when "
        "it was delivered, 1 with the server's message when not.",
    )
    send.set_defaults(handler=cmd_send)
    _add_verbose(send)  # also before the event type: `send -v track ...`
    kinds = send.add_subparsers(dest="event_type", metavar="TYPE", required=True)
    parents = [common, credentials]

    def kind(name: str, help: str, build: Callable[[argparse.Namespace], Event]) -> Any:
        parser = kinds.add_parser(name, help=help, description=help, parents=parents)
        parser.set_defaults(build=build)
        parser.add_argument("--ip", metavar="IP", help="the end user's IP, for geo location")
        parser.add_argument(
            "--user-agent", metavar="UA", help="the end user's user agent, for device detection"
        )
        _add_timeout(parser, 5.0)
        return parser

    def props(parser: Any) -> None:
        parser.add_argument(
            "--prop",
            dest="props",
            action="append",
            type=parse_property,
            metavar="KEY=VALUE",
            help="a property (repeatable); VALUE is JSON when it parses (42, true, null, "
            '{"a": 1}), else text; quote it as JSON to force text: key=\'"42"\'',
        )

    track = kind("track", "track a named event", build_track)
    track.add_argument("name", metavar="NAME")
    props(track)
    track.add_argument("--profile-id", metavar="ID")
    track.add_argument(
        "--group", dest="groups", action="append", metavar="ID", help="a group id (repeatable)"
    )

    identify = kind("identify", "create or update a profile", build_identify)
    identify.add_argument("profile_id", metavar="PROFILE_ID")
    identify.add_argument("--first-name")
    identify.add_argument("--last-name")
    identify.add_argument("--email")
    identify.add_argument("--avatar", metavar="URL")
    props(identify)

    for name, build, verb in (
        ("increment", build_increment, "add to"),
        ("decrement", build_decrement, "subtract from"),
    ):
        parser = kind(name, f"{verb} a numeric property of a profile", build)
        parser.add_argument("profile_id", metavar="PROFILE_ID")
        parser.add_argument("property", metavar="PROPERTY", help="dots mean nesting: a.b")
        parser.add_argument("--value", type=_number, default=1, help="> 0 (default: 1)")

    group = kind("group", "create or update a group", build_group)
    group.add_argument("id", metavar="ID")
    group.add_argument("--type", required=True, help='the kind of group, e.g. "company"')
    group.add_argument("--name", required=True, help="its display name")
    props(group)

    assign = kind("assign_group", "link a profile to one or more groups", build_assign_group)
    assign.add_argument("group_ids", metavar="GROUP_ID", nargs="+")
    assign.add_argument(
        "--profile-id", metavar="ID", help="without one the server uses its device id"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The asyncio-native OpenPanel client, from the command line.",
        epilog=f"Credentials come from --client-id/--client-secret/--api-url or "
        f"{ENV_CLIENT_ID}/{ENV_CLIENT_SECRET}/{ENV_API_URL}. Start with '{PROG} demo'.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_verbose(parser)  # also before the command: `openpanel-async -v send ...`
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    credentials = _credential_options()

    demo = commands.add_parser(
        "demo",
        help="see the client at work in a few seconds, on a local server",
        description="Start a local OpenPanel server and push a realistic mix of events "
        "through the real client, rate limits included; then show what happened. With "
        "--client-id, send a small demo set to that project instead.",
        parents=[common, credentials],
    )
    demo.set_defaults(handler=cmd_demo)
    demo.add_argument(
        "--seconds", type=_positive_float, default=3.0, help="how long to send (default: 3)"
    )
    demo.add_argument(
        "--events", type=_positive_int, metavar="N", help="stop after this many events"
    )
    demo.add_argument(
        "--local", action="store_true", help="use the local server even with --client-id"
    )
    demo.add_argument("--no-progress", action="store_true", help="no live progress line")
    _add_timeout(demo, 5.0)

    serve = commands.add_parser(
        "serve",
        help="run a local OpenPanel server and print what it receives",
        description="Run the local OpenPanel server of openpanel_async.testing in the "
        "foreground, printing one line per request; a summary on Ctrl-C.",
        parents=[common],
    )
    serve.set_defaults(handler=cmd_serve)
    serve.add_argument(
        "--port", type=_port, default=3333, help="(default: %(default)s; 0 picks a free one)"
    )
    serve.add_argument("--rate-limit", type=parse_rate, metavar="R/s", help="e.g. 100/s, 600/min")
    serve.add_argument(
        "--fail-rate",
        type=parse_fraction,
        default=0.0,
        metavar="P",
        help="share of requests answered 500/502/503, e.g. 0.1 or 10%%",
    )
    serve.add_argument(
        "--delay",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before each answer",
    )
    serve.add_argument("--seed", type=int, help="seed the simulated failures")
    serve.add_argument("--client-id", metavar="ID", help="require this client id (default: any)")
    serve.add_argument("--client-secret", metavar="SECRET", help="require this secret")
    serve.add_argument("--json", action="store_true", help="print JSON lines")

    _add_send_parsers(commands, common, credentials)

    importer = commands.add_parser(
        "import",
        help="send every event of a JSON Lines file",
        description='Send every {"type": ..., "payload": ...} line of FILE (- for stdin) '
        "through the client at full speed, keeping each track's __timestamp.",
        parents=[common, credentials],
    )
    importer.set_defaults(handler=cmd_import)
    importer.add_argument("file", metavar="FILE")
    importer.add_argument(
        "--failed", metavar="FILE", help="write the lines that failed here, to retry them"
    )
    importer.add_argument(
        "--concurrency",
        type=_positive_int,
        default=64,
        metavar="N",
        help="requests in flight at most (default: %(default)s)",
    )
    importer.add_argument(
        "--queue-size",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events held in memory at most (default: %(default)s)",
    )
    importer.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="on Ctrl-C, how long to drain (default: %(default)s)",
    )
    importer.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_timeout(importer, 10.0)
    return parser
