"""What every command shares: the exit codes, reading the config, printing JSON.

The exit codes are a promise to scripts (cron jobs, monitoring, CI):

    0  ok
    1  failed: the command ran and the answer is "no" (a check found problems,
       a send was refused, a study is not in the store)
    2  usage: the command line is wrong (argparse's own errors, options that do
       not go together; ``models promote``: models or data that cannot be
       compared as asked)
    3  configuration or schema: a config file, rules file, procedures file or
       model the command was given cannot be used, or the database schema is
       older than this nnrouter (``nnrouter db upgrade``)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nnrouter.core import config as config_mod
from nnrouter.core import yamlfile

OK, FAILED, USAGE, CONFIG = 0, 1, 2, 3

EXIT_CODES = """\
exit codes:
  0  ok
  1  failed: the command ran and the answer is "no" (problems found, a peer refused, no such study)
  2  usage: the command line is wrong (missing or clashing options; models promote: these cannot be compared)
  3  configuration or schema: a config, rules, procedures file or model that cannot be used,
     or a database schema older than this nnrouter (run `nnrouter db upgrade`)
"""


class Unusable(Exception):
    """What the command was given cannot be used (config, rules, model, schema): ``main`` exits 3 with the message."""


def settings(args: argparse.Namespace) -> config_mod.Settings:
    try:
        return config_mod.load(args.config)
    except yamlfile.FileProblems as exc:
        raise Unusable(f"configuration is not valid:\n{exc}") from None


def store(settings: config_mod.Settings) -> Any:
    from nnrouter.core.store import Store

    return Store(settings.database.url)


def print_json(obj: Any) -> None:
    from nnrouter.core.plain import dumps

    print(dumps(obj, indent=2))


def err(message: str, code: int = FAILED) -> int:
    """Say why on stderr and give the exit code back."""
    print(message, file=sys.stderr)
    return code


def problems_dicts(exc: yamlfile.FileProblems) -> list[dict[str, Any]]:
    return [
        {"file": p.file, "line": p.line, "column": p.column, "field": p.field, "reason": p.reason} for p in exc.problems
    ]


def loaded(
    load: Callable[[Path], Any], path: Path, *, verdict: bool = False, problems: list[dict[str, Any]] | None = None
) -> Any:
    """What ``load`` makes of a YAML file, or None after printing every problem with file, line and field.

    ``problems``, when given, collects them as plain data too (for ``--json``).
    """
    try:
        return load(path)
    except yamlfile.FileProblems as exc:
        print(str(exc), file=sys.stderr)
        if verdict:
            print(f"{len(exc.problems)} problem(s); the file was not used", file=sys.stderr)
        if problems is not None:
            problems.extend(problems_dicts(exc))
        return None


def load_rules(
    path: Path,
    *,
    verdict: bool = False,
    detector: Any = None,
    problems: list[dict[str, Any]] | None = None,
    calling_ae: str | None = None,
) -> Any:
    """The rule file (rules.RuleSet), or None after printing every problem with file, line and field.

    ``detector`` (rules.DetectorRegions): region conditions are checked against what it can find.
    ``calling_ae`` (dicom.ae_title): the calling AE of destinations that name none.
    """
    from functools import partial

    from nnrouter.routing import rules

    load = partial(rules.load_rules, detector=detector, calling_ae=calling_ae)
    return loaded(load, path, verdict=verdict, problems=problems)


def detector_regions(settings: config_mod.Settings) -> Any:
    """What the configured detector can find (rules.DetectorRegions); Unusable if its card is."""
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.routing import rules

    try:
        return rules.detector_regions(settings.models.detector)
    except ModelCardError as exc:
        raise Unusable(f"models.detector: {exc}") from None


def require_current_schema(store: Any) -> None:
    from nnrouter.core.store import SchemaOutOfDate

    try:
        store.require_current()
    except SchemaOutOfDate as exc:
        raise Unusable(str(exc)) from None


@contextlib.contextmanager
def chatter_to_stderr(json_out: bool) -> Iterator[None]:
    """With ``--json`` stdout carries the JSON alone: what library code prints on the way goes to stderr."""
    if json_out:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON (one document on stdout)")


Command = Callable[[argparse.Namespace], int]


def add(
    parent: Any,
    name: str,
    func: Command,
    help: str,
    *,
    config: str = "optional",
    json: bool = False,
    replaced_by: str | None = None,
) -> argparse.ArgumentParser:
    """One sub-command: its function, ``--config`` (optional, required or none) and ``--json``.

    ``replaced_by`` marks an old name kept for one release: it still works and
    says on stderr what to type instead.
    """
    if replaced_by is not None:
        help = f"old name of `nnrouter {replaced_by}` (works for one more release)"
    sp = parent.add_parser(name, help=help, description=help)
    sp.set_defaults(func=func, replaced_by=replaced_by)
    if config != "none":
        sp.add_argument(
            "--config",
            "-c",
            type=Path,
            required=config == "required",
            help="YAML config file" + (" (default: embedded defaults)" if config == "optional" else ""),
        )
    if json:
        add_json(sp)
    return sp


def group(sub: Any, name: str, help: str) -> Any:
    """A noun with verbs under it (``nnrouter study show``)."""
    return sub.add_parser(name, help=help, description=help).add_subparsers(dest="sub", required=True)
