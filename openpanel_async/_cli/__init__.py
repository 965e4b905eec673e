"""The ``openpanel-async`` command line: ``demo``, ``serve``, ``send`` and ``import``.

Standard-library argparse over the public client and the local test server; no dependency
beyond the package's own. User mistakes end as one line on stderr, never a traceback.

Exit statuses: 0 done; 1 failed (an event was not delivered, credentials refused, a port in
use, ...); 2 usage (bad arguments, missing credentials or file, an invalid event);
130 interrupted.

One module a job: ``_parser`` (commands, options and their types), ``_common`` (exit
statuses, credentials, the client), ``_output`` (what is printed, the progress line), and
one module per command: ``_demo`` (with ``_demo_events``), ``_serve``, ``_send`` and
``_import`` (with ``_input``, which reads the file).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ._common import EXIT_FAILURE, EXIT_INTERRUPTED, CliError
from ._output import error_line
from ._parser import build_parser

__all__ = ["main"]


def _configure_logging(verbose: bool) -> None:
    log = logging.getLogger("openpanel_async")
    log.propagate = False
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.setLevel(logging.INFO)
    else:
        # The commands report failures themselves; the library's log would repeat them.
        handler = logging.NullHandler()
    log.handlers = [handler]


def _safe_streams() -> None:
    # Payloads are anyone's text: a terminal that cannot show a character gets an escape
    # rather than a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _safe_streams()
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as exc:
        error_line(str(exc))
        return exc.status
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        # Output that cannot be written (a full disk, a closed stream): one line, no
        # traceback. Network errors never get here: the client handles them.
        error_line(f"cannot write output: {exc.strerror or exc}")
        return EXIT_FAILURE
