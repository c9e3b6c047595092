"""The view classes nnrouter knows, and the DICOM codes each one maps to.

The table is package data (``nnrouter/data/classes.csv``) rather than code so
that a coding correction is a one-line data change, reviewed like any other.
Results leave nnrouter as standard DICOM objects, so every class carries the
codes those objects need: Body Part Examined, View Position, a SNOMED CT view
code, a SNOMED CT anatomy code and the LOINC codes of procedures that order it.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import cast

from pydicom.dataset import Dataset

__all__ = ["FAMILIES", "UNKNOWN", "Code", "ViewClass", "classes", "family", "nncpr_labels", "sct_meaning"]

SCT = "SCT"  # Coding Scheme Designator for SNOMED CT in DICOM
LN = "LN"  # ... and for LOINC

# A parenthetical holding a code ("axial (399284007 Merchant)") is an aside for
# readers of the table, not part of the code meaning.
_CODE_ASIDE = re.compile(r"\s*\([^)]*\d{6,}[^)]*\)")


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str  # DICOM Coding Scheme Designator: "SCT" or "LN"
    meaning: str = ""

    def item(self) -> Dataset:
        """The code as a code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
        item = Dataset()
        item.CodeValue = self.value
        item.CodingSchemeDesignator = self.scheme
        item.CodeMeaning = self.meaning
        return item


@dataclass(frozen=True)
class ViewClass:
    name: str
    body_part_examined: str
    view_position: str  # "" when DICOM has no View Position term for it
    view_code: Code | None  # None where CID 4010 has no code (panoramic)
    anatomy_code: Code
    order_codes: tuple[Code, ...]  # LOINC procedures whose expected image this is
    note: str
    view_remark: str = ""  # what the table says beyond the code meaning, e.g. a patient position code
    nncpr: bool = True  # one of the 30 classes of the NNCPR paper; False for nnrouter's own (classes_own.csv)


def classes() -> dict[str, ViewClass]:
    """All view classes by name, in table order. A fresh dict each call; the classes are immutable."""
    return {c.name: c for c in _load()}


def nncpr_labels() -> list[str]:
    """The NNCPR classifier's output order, which differs from the table's."""
    return list(_nncpr())


@cache
def _load() -> tuple[ViewClass, ...]:
    # The NNCPR table is kept byte-for-byte as published; classes of our own
    # (a whole-spine survey) live beside it so the copy never drifts.
    return _read_table("classes.csv", nncpr=True) + _read_table("classes_own.csv", nncpr=False)


def _read_table(name: str, *, nncpr: bool) -> tuple[ViewClass, ...]:
    text = files("nnrouter.data").joinpath(name).read_text(encoding="utf-8")
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        meaning, _, remark = (row["view_meaning"] or "").partition(";")
        aside = " ".join(m.strip(" ()") for m in _CODE_ASIDE.findall(meaning))
        meaning = _CODE_ASIDE.sub("", meaning).strip()
        remark = "; ".join(s for s in (aside, remark.strip()) if s)
        view = row["view_code_sct"].strip()
        out.append(
            ViewClass(
                name=row["class"].strip(),
                body_part_examined=row["body_part_examined"].strip(),
                view_position=row["view_position"].strip(),
                view_code=Code(view, SCT, meaning) if view else None,
                anatomy_code=Code(row["anatomy_code_sct"].strip(), SCT),
                order_codes=tuple(Code(c, LN) for c in row["order_loinc"].split()),
                note=(row["note"] or "").strip(),
                view_remark=remark,
                nncpr=nncpr,
            )
        )
    return tuple(out)


@cache
def _nncpr() -> tuple[str, ...]:
    text = files("nnrouter.data").joinpath("nncpr_classes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def _sct_meanings() -> dict[str, str]:
    from pydicom.sr._concepts_dict import concepts

    # pydicom's generated table mixes schemes, so mypy infers its values as object.
    sct = cast(dict[str, dict[str, tuple[str, list[int]]]], concepts["SCT"])
    best: dict[str, tuple[int, str]] = {}
    for entries in sct.values():
        for code, (meaning, cids) in entries.items():
            rank = 0 if 4031 in cids else 1 if 4 in cids else 2 if cids else 3
            if code not in best or rank < best[code][0]:
                best[code] = (rank, meaning)
    return {code: meaning for code, (_, meaning) in best.items()}


def sct_meaning(code: str) -> str | None:
    """The meaning DICOM gives a SNOMED CT code, from pydicom's concept table.

    classes.csv carries anatomy codes without meanings; a code item needs one.
    Meanings from the anatomic region context groups (CID 4031, then CID 4) win.
    """
    return _sct_meanings().get(code)


# --- view families ------------------------------------------------------------

UNKNOWN = "unknown"  # the classifier's label below its calibrated threshold: no view class

# Reading order of view families; "other" holds the special projections
# (axial, outlet, decubitus, panoramic) that complement the standard pair.
FAMILIES = ("frontal", "lateral", "oblique", "other")
FRONTAL_POSITIONS = frozenset({"AP", "PA"})
LATERAL_POSITIONS = frozenset({"LL", "RL", "LATERAL"})
DECUBITUS_POSITIONS = frozenset({"LLD", "RLD"})
_FRONTAL_MEANINGS = frozenset(
    {"antero-posterior", "postero-anterior", "dorso-plantar", "dorsoplantar", "dorso-palmar", "frontal"}
)


def family(name: str) -> str:
    """The view family of a class: frontal, lateral, oblique or other (``unknown`` for the unknown label).

    A property of the class table, shared by the hanging protocols (reading
    order) and the ordered-vs-performed check (frontal and lateral), so it
    is derived here from the class name, its View Position and its view code
    meaning: a new class in the table is placed without touching code.
    """
    if name == UNKNOWN:
        return UNKNOWN
    try:
        c = classes()[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a view class in classes.csv") from None
    words = set(name.lower().split("_"))
    meaning = (c.view_code.meaning if c.view_code else "").lower()
    if c.view_position in DECUBITUS_POSITIONS or "decubitus" in words:
        return "other"
    if "oblique" in words or "oblique" in meaning:
        return "oblique"
    if "lateral" in words or c.view_position in LATERAL_POSITIONS or meaning.endswith("lateral"):
        return "lateral"
    if c.view_position in FRONTAL_POSITIONS or meaning in _FRONTAL_MEANINGS:
        return "frontal"
    return "other"
