"""DICOM attribute matching (PS3.4 C.2.2.2), shared by every C-FIND nnrouter answers or checks.

The query SCP over the store (``nnrouter.dicom.query``), the Hanging Protocol
FIND (``nnrouter.dicom.protocols_find``) and the worklist SCU
(``nnrouter.dicom.worklist``) all read keys the same way: an empty value
matches everything, ``*`` and ``?`` are wildcards, a backslash makes a list,
dates and times take ranges, numbers compare as numbers, UIDs match as a
list. Pure functions on values, so each service keeps its own idea of where
the values come from (SQL columns, in-memory data sets).
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

__all__ = [
    "NO_WILDCARD_VRS",
    "NUMERIC_VRS",
    "RANGE_VRS",
    "date_range",
    "element_matches",
    "element_values",
    "glob_pattern",
    "has_wildcard",
    "int_matches",
    "key_problem",
    "like_pattern",
    "query_values",
    "time_key",
    "time_matches",
    "wildcard_match",
]

NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "IS", "DS"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
# Keys of these VRs match single values or ranges only (PS3.4 C.2.2.2.4).
NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT"}) | NUMERIC_VRS


def query_values(value: Any) -> list[str] | None:
    """A key's value as a list of items; None for universal matching (empty, or only ``*``)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").rstrip("\0 ").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        items = [str(v) if v is not None else "" for v in value]
    else:
        items = [str(value)]
    items = [v.strip().rstrip("\0") for v in items]
    items = [v for v in items if v]
    if not items or any(set(v) == {"*"} for v in items):
        return None
    return items


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQL LIKE pattern, escape character backslash."""
    out = []
    for c in value:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c in "%_\\":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (case-sensitive, unlike LIKE)."""
    return "".join("[[]" if c == "[" else c for c in value)


def wildcard_match(pattern: str, value: str | None, *, ignore_case: bool = False) -> bool:
    if value is None:
        return False
    if ignore_case:
        pattern, value = pattern.casefold(), value.casefold()
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.DOTALL) is not None


def date_range(value: str) -> tuple[str | None, str | None]:
    """``A-B``, ``A-``, ``-B`` or ``A`` as (low, high), either open (None)."""
    value = value.replace(".", "").strip()
    if "-" not in value:
        return value, value
    lo, _, hi = value.partition("-")
    return lo.strip() or None, hi.strip() or None


def time_key(value: str, *, upper: bool = False) -> str:
    """A TM value made comparable: HHMMSS.ffffff, a partial time filled to its start (or end)."""
    value = value.replace(":", "").strip()
    main, _, frac = value.partition(".")
    main = main[:6]
    fill = "595959" if upper else "000000"
    main = main + fill[len(main) :]
    if len(value.partition(".")[0]) < 6:
        frac = ""
    frac = frac[:6].ljust(6, "9" if upper else "0")
    return f"{main}.{frac}"


def time_matches(query: str, value: str | None) -> bool:
    """A TM value against a time or a range; a partial time stands for the whole span it names."""
    if not value:
        return False
    if "-" in query:
        lo, _, hi = query.partition("-")
    else:
        lo = hi = query
    v = time_key(value)
    if lo.strip() and v < time_key(lo):
        return False
    return not (hi.strip() and v > time_key(hi, upper=True))


def int_matches(query: str, value: Any) -> bool:
    try:
        return value not in (None, "") and int(float(str(value))) == int(float(query))
    except ValueError:
        return False


# --- keys and values of in-memory data sets -----------------------------------


def _str(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def element_values(elem: DataElement) -> list[str]:
    """An element's values as strings; empty for an empty (universal) key."""
    v = elem.value
    if v is None or v == "" or v == b"":
        return []
    if isinstance(v, (list, tuple, MultiValue)):
        return [_str(x) for x in v]
    return [_str(v)]


def key_problem(vr: str, values: list[str]) -> str | None:
    """Why a key of this VR cannot be matched as given (a wildcard in a UID, a date that is no range), or None."""
    if vr in NO_WILDCARD_VRS and any(has_wildcard(v) for v in values):
        return f"no wildcards in a {vr} key"
    if vr in NUMERIC_VRS:
        for v in values:
            try:
                float(v)
            except ValueError:
                return f"{v!r} is not a number"
    if vr in RANGE_VRS:
        for v in values:
            if not re.fullmatch(r"[0-9.+\-]*", v) or v.count("-") > 1 + (vr == "DT") * 2:
                return f"{v!r} is not a {vr} value or range"
    return None


def element_matches(vr: str, wanted: list[str], have: list[str]) -> bool:
    """Whether the values a data set holds match a key's values (non-empty, checked by key_problem)."""
    if not have:
        return False
    if vr == "UI":
        return any(h in wanted for h in have)  # list of UID matching
    if len(wanted) > 1:
        # A multi-valued key is matched value by value.
        return wanted == have
    (w,) = wanted
    if vr in NUMERIC_VRS:
        return any(float(h) == float(w) for h in have)
    if vr in RANGE_VRS and _is_range(vr, w):
        lo, hi = _split_range(vr, w)
        return any((not lo or h[: len(lo)] >= lo) and (not hi or h[: len(hi)] <= hi) for h in have)
    if has_wildcard(w):
        return any(wildcard_match(w, h) for h in have)
    return any(h == w for h in have)


def _is_range(vr: str, w: str) -> bool:
    if vr != "DT":
        return "-" in w
    # DT values may carry a UTC offset "-hhmm": a range has a '-' at position 0 or after a full value.
    return bool(re.fullmatch(r"(\d*(?:[.\d]*)(?:[+\-]\d{4})?)?-(\d*(?:[.\d]*)(?:[+\-]\d{4})?)?", w))


def _split_range(vr: str, w: str) -> tuple[str, str]:
    if vr == "DT":
        m = re.fullmatch(r"([\d.]*(?:[+\-]\d{4})?)-([\d.]*(?:[+\-]\d{4})?)", w)
        if m is None:
            raise ValueError(f"{w!r} is not a DT range")
        # Offsets are not compared: the data sets matched here carry none.
        return re.sub(r"[+\-]\d{4}$", "", m.group(1)), re.sub(r"[+\-]\d{4}$", "", m.group(2))
    lo, _, hi = w.partition("-")
    return lo, hi
