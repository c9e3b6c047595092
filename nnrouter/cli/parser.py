"""The ``nnrouter`` argument parser: the top level here, each command group's options in its own module."""

from __future__ import annotations

import argparse

from nnrouter.cli import (
    bench,
    dicom,
    models,
    orders,
    outbox,
    protocols,
    rules,
    service,
    study,
    training,
    web,
)
from nnrouter.cli.common import EXIT_CODES

DESCRIPTION = """\
The nnrouter command: one entry point, one sub-command per job.

Each sub-command reads the config once and builds only what it needs, so
`nnrouter status` on a busy node touches nothing but the database. Commands
that print a result take --json for scripts.
"""


def version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("nnrouter")
    except PackageNotFoundError:
        from nnrouter import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnrouter",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"nnrouter {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (service, dicom, rules, outbox, study, protocols, orders, models, training, bench, web):
        group.register(sub)
    return p
