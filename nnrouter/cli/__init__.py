"""The ``nnrouter`` command line: argument parsing and printing only.

Each command parses its arguments and calls library functions (the views in
``nnrouter.results.views``, ``nnrouter.routing.deliveries``,
``nnrouter.service.status`` and the like); what a command prints with
``--json`` is the plain data those return. Training and testing wings are
imported inside the commands that need them, never at import time, so a
node without the [train] extra runs every other command.

Exit codes (``nnrouter --help`` shows them): 0 ok, 1 failed, 2 usage,
3 configuration or schema (see ``nnrouter.cli.common``).
"""

from __future__ import annotations

import os
import sys

from nnrouter.cli.common import CONFIG, FAILED, OK, USAGE, Unusable
from nnrouter.cli.parser import build_parser
from nnrouter.core import logs

__all__ = ["CONFIG", "FAILED", "OK", "USAGE", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replaced_by:
        print(
            f"nnrouter: `{args.command}` is now `nnrouter {args.replaced_by}`; the old name goes in the next release",
            file=sys.stderr,
        )
    # Until a command sets logging up from its config: on stderr, never into
    # the result on stdout (structlog's own default prints to stdout).
    logs.setup("info", "auto")
    try:
        return args.func(args)
    except Unusable as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return CONFIG
    except BrokenPipeError:  # `nnrouter ... | head`: the reader has gone, nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout again at exit
        return FAILED
