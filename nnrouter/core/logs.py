"""Logging: structlog, readable on a terminal, JSON lines elsewhere, and no patient data at info.

Logs leave the hospital network more often than anyone intends (tickets,
vendor support, log shippers). UIDs and accession numbers are fine to log;
patient names, IDs and birth dates are not, at any level above debug. The
stages avoid logging them in the first place; the ``_drop_phi`` processor is
the second line of defence for a key that slips in.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import structlog

PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "birth_date",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "OtherPatientNames",
    }
)


def _drop_phi(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if method != "debug":
        for key in PHI_KEYS & event.keys():
            event[key] = "<redacted>"
    return event


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was set up.

    The command line sets logging up before each command; a caller that
    swaps stderr afterwards (pytest's capture, ``contextlib.redirect_stderr``)
    must not leave loggers writing to a stream it has since closed.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def console_wanted(fmt: str, stream: Any) -> bool:
    """``auto``: console lines where a person reads them (a terminal), JSON lines where a program does."""
    if fmt != "auto":
        return fmt == "console"
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog, and route the stdlib loggers libraries use through it.

    ``fmt`` is json, console, or auto (console when ``stream``, stderr by
    default, is a terminal). The terminal is judged on the stream the logs go
    to: ``nnrouter serve 2>file`` writes JSON to the file. Console lines show
    tracebacks plainly: a rich traceback would print each frame's local
    variables, datasets with patient names among them.
    """
    numeric = getattr(logging, level.upper())
    stream = stream or _Stderr()
    console = console_wanted(fmt, stream)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=bool(fmt == "auto"), exception_formatter=structlog.dev.plain_traceback)
        if console
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        # The PHI filter (in shared) runs before either renderer; the console one formats exceptions itself.
        processors=[*shared, *([] if console else [structlog.processors.format_exc_info]), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Library log records become the same lines as ours.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    # pynetdicom logs whole DIMSE messages (identifiers included) at info and
    # debug: keep its warnings (timeouts, aborts) only. pydicom's warnings
    # about odd values quote the values, names included: silent unless debug.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom's (building the SR) quote patient names the same way.
    for quoting in ("pydicom", "highdicom"):
        logging.getLogger(quoting).setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.ERROR)
    if numeric > logging.DEBUG:
        warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\..*)?")
    logging.captureWarnings(True)


def get(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
