"""Logging: structlog, JSON lines by default, and no patient data at info.

Logs leave the hospital network more often than anyone intends (tickets,
vendor support, log shippers). UIDs and accession numbers are fine to log;
patient names, IDs and birth dates are not, at any level above debug. The
stages avoid logging them in the first place; the ``_drop_phi`` processor is
the second line of defence for a key that slips in.
"""

from __future__ import annotations

import logging
import sys
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


def setup(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog and the stdlib loggers that libraries use."""
    numeric = getattr(logging, level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs whole DIMSE messages (with identifiers) at debug/info;
    # we write our own association lines, so keep it to warnings and above.
    logging.basicConfig(stream=stream or sys.stderr, level=max(numeric, logging.WARNING))
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))


def get(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
