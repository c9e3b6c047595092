"""Query: a C-FIND SCP over the store, so a PACS can search what nnrouter tagged.

``nnrouter serve`` answers C-FIND on the same AE title and port as C-STORE, for
the Patient Root (1.2.840.10008.5.1.4.1.2.1.1) and Study Root
(1.2.840.10008.5.1.4.1.2.2.1) Query/Retrieve Information Models - FIND. The
calling-AE allow-list applies as for C-STORE (it is checked when the
association is requested). What a query finds can be fetched with C-GET or
C-MOVE (``nnrouter.dicom.retrieve``), by the same peers.

Levels and keys
---------------

========  ==================================================================
PATIENT   (Patient Root only) PatientName, PatientID, PatientBirthDate,
          PatientSex, NumberOfPatientRelatedStudies/Series/Instances
STUDY     the patient keys, StudyInstanceUID, StudyDate, StudyTime,
          AccessionNumber, StudyID (always empty: not kept), StudyDescription,
          ReferringPhysicianName, ModalitiesInStudy,
          NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances and the
          private Mismatch Flags key below
SERIES    the study keys, SeriesInstanceUID, Modality, SeriesNumber,
          SeriesDescription, BodyPartExamined, NumberOfSeriesRelatedInstances
IMAGE     the series keys, SOPInstanceUID, SOPClassUID, InstanceNumber,
          ViewPosition, ImageLaterality, BodyPartExamined, Rows, Columns,
          ViewCodeSequence (CodeValue, CodingSchemeDesignator, CodeMeaning)
========  ==================================================================

Keys of the query level and of the levels above it are matched (so a SERIES
query may say PatientID or StudyDate); other keys are answered zero-length.

Matching (PS3.4 C.2.2.2): an empty value is universal matching; ``*`` and
``?`` are wildcards; a value with a backslash is a list (any item matches);
dates match ranges (``A-B``, ``A-``, ``-B``); times match ranges too, a
partial time standing for the whole span it names (``-12`` ends at
12:59:59.999999); numbers (IS, US) match numerically. Strings match
case-sensitively, person names case-insensitively (common practice), with
trailing ``^`` ignored. Date and time are matched independently, not as one
date-time.

What nnrouter found
-------------------

At the IMAGE level, BodyPartExamined, ViewPosition and ViewCodeSequence come
from the newest prediction of the instance when its label is a view class
(not ``unknown``): the class's Body Part Examined, View Position (empty where
the class has none) and SNOMED CT view code (CodingSchemeDesignator ``SCT``)
from ``nnrouter/data/classes.csv``. Without such a prediction they are the
header values the instance arrived with (no ViewCodeSequence then). Matching
uses these same values, so ``ViewCodeSequence[0].CodeValue=399173006`` with
``BodyPartExamined=CHEST`` finds every chest lateral, whatever its header said.
At the SERIES level, BodyPartExamined matches when the series header or any
of its images' values matches; the answer is the header value when it
matches, else the least matching image value.

Private key: Mismatch Flags
---------------------------

The ordered-vs-performed check's flags of a study can be returned and matched
through a private attribute, private creator ``NNROUTER`` in group 0075::

    (0075,0010) LO  "NNROUTER"          private creator
    (0075,1010) CS  Mismatch Flags      VM 1-n

The value is the distinct kinds of the study's flags (``nnrouter.orders.order.FlagKind``),
in upper case as CS requires, sorted: for example
``HEADER_CONFLICT\\MISSING_VIEW``. In a query (at the STUDY level or below):

- zero-length: no filter; the flags are returned (empty when there are none);
- a kind, or a list ``a\\b``: only studies with at least one such flag; the
  kinds match whatever their case (``wrong_body_part`` = ``WRONG_BODY_PART``),
  wildcards allowed;
- ``*``: only studies with at least one flag of any kind.

Any block of group 0075 whose creator is ``NNROUTER`` is read; answers always
use block 10, i.e. (0075,0010) and (0075,1010). DCMTK's findscu sends the
zero-length key as is (``-k 0075,0010=NNROUTER -k 0075,1010``); to give it a
value, findscu needs the VR from a dictionary line::

    (0075,"NNROUTER",10)	CS	MismatchFlags	1-n	PrivateTag

in a file added to ``DCMDICTPATH`` (after DCMTK's own ``dicom.dic``), then
``-k 0075,1010=WRONG_BODY_PART``. Orthanc (``/modalities/{id}/query``) sends it
with ``"Normalize": false`` and the two tags in ``Query``.

Limits and logs
---------------

A query answers at most ``MAX_RESULTS`` matches, in the order they were
received; beyond that it ends with success after the last one and logs a
warning. Each query logs one info line: the model, level, the keys used (by
keyword, never values), the number of matches and the duration.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydicom import Dataset
from pydicom.datadict import add_private_dict_entry, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import (
    Select,
    and_,
    case,
    distinct,
    exists,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from nnrouter.core import logs
from nnrouter.core.codes import classes
from nnrouter.core.store import Flag, Instance, Prediction, Series, Store, Study
from nnrouter.dicom.matching import (
    date_range,
    glob_pattern,
    has_wildcard,
    int_matches,
    like_pattern,
    query_values,
    time_matches,
    wildcard_match,
)
from nnrouter.dicom.statuses import (
    CANCEL,
    DATABASE_ERROR,
    IDENTIFIER_DOES_NOT_MATCH,
    PENDING,
    UNABLE_TO_PROCESS,
    with_comment,
)

__all__ = [
    "MAX_RESULTS",
    "MISMATCH_FLAGS_TAG",
    "PATIENT_ROOT_FIND",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "STUDY_ROOT_FIND",
    "TRANSFER_SYNTAXES",
    "BadIdentifier",
    "Query",
    "Request",
    "parse_request",
]

log = logs.get("nnrouter.dicom.query")

PATIENT_ROOT_FIND = PatientRootQueryRetrieveInformationModelFind
STUDY_ROOT_FIND = StudyRootQueryRetrieveInformationModelFind
MODELS = {PATIENT_ROOT_FIND: "patient", STUDY_ROOT_FIND: "study"}
LEVELS = {PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"), STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE")}

# Identifiers are small: the uncompressed syntaxes (and deflate) are enough.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

# At most this many matches per query; then the query ends (success) and a warning is logged.
MAX_RESULTS = 1000

PRIVATE_GROUP = 0x0075
PRIVATE_CREATOR = "NNROUTER"
MISMATCH_FLAGS_OFFSET = 0x10  # (0075,xx10): (0075,1010) in block 10
MISMATCH_FLAGS_TAG = Tag(PRIVATE_GROUP, 0x1000 | MISMATCH_FLAGS_OFFSET)  # as answered
MISMATCH_FLAGS = "MismatchFlags"  # the keyword the info log uses for it

# So that an implicit VR identifier decodes the private key as CS, not UN.
add_private_dict_entry(PRIVATE_CREATOR, 0x00751000 | MISMATCH_FLAGS_OFFSET, "CS", "Mismatch Flags", "1-n")

_LEVEL_RANK = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}

# kind of matching per key: uid (list), cs (case-sensitive string), pn (person
# name), da (date), tm (time), is (integer string), us (integer), count (return only).
_KEYS: dict[str, dict[str, str]] = {
    "PATIENT": {
        "PatientName": "pn",
        "PatientID": "cs",
        "PatientBirthDate": "da",
        "PatientSex": "cs",
        "NumberOfPatientRelatedStudies": "count",
        "NumberOfPatientRelatedSeries": "count",
        "NumberOfPatientRelatedInstances": "count",
    },
    "STUDY": {
        "StudyInstanceUID": "uid",
        "StudyDate": "da",
        "StudyTime": "tm",
        "AccessionNumber": "cs",
        "StudyID": "empty",
        "StudyDescription": "cs",
        "ReferringPhysicianName": "pn",
        "ModalitiesInStudy": "cs",
        "NumberOfStudyRelatedSeries": "count",
        "NumberOfStudyRelatedInstances": "count",
    },
    "SERIES": {
        "SeriesInstanceUID": "uid",
        "Modality": "cs",
        "SeriesNumber": "is",
        "SeriesDescription": "cs",
        "BodyPartExamined": "cs",
        "NumberOfSeriesRelatedInstances": "count",
    },
    "IMAGE": {
        "SOPInstanceUID": "uid",
        "SOPClassUID": "uid",
        "InstanceNumber": "is",
        "ViewPosition": "cs",
        "ImageLaterality": "cs",
        "BodyPartExamined": "cs",
        "Rows": "us",
        "Columns": "us",
        "ViewCodeSequence": "seq",
    },
}
_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_CODE_ITEM_KEYS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")


def keys_for(level: str) -> dict[str, str]:
    """The keys matched at ``level``: its own and those of the levels above it."""
    out: dict[str, str] = {}
    for name, rank in _LEVEL_RANK.items():
        if rank <= _LEVEL_RANK[level]:
            out.update(_KEYS[name])
    return out


# --- the effective (found) values --------------------------------------------


@dataclass(frozen=True)
class _Found:
    body_part: dict[str, str]
    view_position: dict[str, str]
    code_value: dict[str, str]
    code_meaning: dict[str, str]


def _found() -> _Found:
    cls = classes()
    return _Found(
        body_part={n: c.body_part_examined for n, c in cls.items()},
        view_position={n: c.view_position for n, c in cls.items()},
        code_value={n: c.view_code.value for n, c in cls.items() if c.view_code},
        code_meaning={n: c.view_code.meaning for n, c in cls.items() if c.view_code},
    )


def _mapped(mapping: dict[str, str], label: Any, fallback: Any) -> ColumnElement:
    """``mapping[label]`` for a known class label, else ``fallback`` (an SQL CASE)."""
    if not mapping:
        return fallback
    return case(mapping, value=label, else_=fallback)


class _Latest:
    """An instance alias joined (outer) to its newest prediction, and the values nnrouter found."""

    def __init__(self, found: _Found, series_body_part: Any, instance: Any = None):
        self.instance = instance if instance is not None else aliased(Instance)
        self.prediction = aliased(Prediction)
        newer = aliased(Prediction)
        self.newest_id = select(func.max(newer.id)).where(newer.instance_id == self.instance.id).scalar_subquery()
        label = self.prediction.label
        self.body_part = _mapped(found.body_part, label, series_body_part)
        self.view_position = _mapped(found.view_position, label, self.instance.view_position)
        none = literal(None, type_=Prediction.label.type)
        self.code_value = case(found.code_value, value=label, else_=none) if found.code_value else none
        self.code_meaning = case(found.code_meaning, value=label, else_=none) if found.code_meaning else none
        self.code_scheme = case((self.code_value.is_not(None), "SCT"), else_=none)

    def join(self, stmt: Select) -> Select:
        return stmt.outerjoin(self.prediction, self.prediction.id == self.newest_id)


# --- one query ---------------------------------------------------------------


class BadIdentifier(ValueError):
    pass


@dataclass
class _Key:
    keyword: str
    tag: int
    vr: str
    kind: str  # as in _KEYS, or "unsupported"
    values: list[str] | None  # None: universal
    items: list[Dataset] = field(default_factory=list)  # sequence items asked for
    asked: bool = True  # False: the level's unique key, answered though not asked


@dataclass
class Request:
    """A parsed C-FIND identifier."""

    level: str
    keys: dict[str, _Key]
    flags: _Key | None  # the private Mismatch Flags key, when asked

    def used(self) -> list[str]:
        out = [k for k, key in self.keys.items() if key.asked]
        if self.flags is not None:
            out.append(MISMATCH_FLAGS)
        return out


def _private_flags(identifier: Dataset) -> _Key | None:
    try:
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    if block.get_tag(MISMATCH_FLAGS_OFFSET) not in identifier:
        return None
    elem = identifier[block.get_tag(MISMATCH_FLAGS_OFFSET)]
    values = query_values(elem.value)
    if values is None and _is_star(elem.value):
        values = ["*"]  # not universal here: studies with any flag
    return _Key(MISMATCH_FLAGS, elem.tag, "CS", "cs", values)


def _is_star(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").rstrip("\0 ").split("\\")
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return any(v is not None and str(v).strip() != "" and set(str(v).strip()) == {"*"} for v in items)


def parse_request(identifier: Dataset, sop_class: str) -> Request:
    """Check and read a C-FIND identifier; BadIdentifier says what is wrong."""
    levels = LEVELS.get(sop_class)
    if levels is None:
        raise BadIdentifier(f"SOP class {sop_class} is not a supported FIND model")
    if "QueryRetrieveLevel" not in identifier:
        raise BadIdentifier("identifier lacks QueryRetrieveLevel")
    level = str(identifier.QueryRetrieveLevel or "").strip().upper()
    if level not in levels:
        raise BadIdentifier(f"QueryRetrieveLevel {level or '(empty)'} not in {MODELS[sop_class]} root")
    supported = keys_for(level)
    keys: dict[str, _Key] = {}
    for elem in identifier:
        tag = elem.tag
        if tag.is_private or tag.group in (0x0000, 0x0002) or tag == 0x00080005 or tag == 0x00080052:
            continue
        keyword = elem.keyword
        if not keyword:
            continue
        kind = supported.get(keyword, "unsupported")
        if kind == "seq":
            items = list(elem.value or [])
            values = None
            keys[keyword] = _Key(keyword, tag, elem.VR, kind, values, items)
            continue
        if elem.VR == "SQ":
            keys[keyword] = _Key(keyword, tag, elem.VR, "unsupported", None)
            continue
        values = query_values(elem.value)
        if kind in ("count", "empty", "unsupported"):
            values = None
        keys[keyword] = _Key(keyword, tag, elem.VR, kind, values)
    unique = _UNIQUE[level]
    if unique not in keys:
        # The unique key of the level is always answered (PS3.4 C.2.2.1.1).
        keys[unique] = _Key(unique, Tag(unique), dictionary_VR(unique), supported[unique], None, asked=False)
    flags = _private_flags(identifier) if level != "PATIENT" else None
    return Request(level=level, keys=keys, flags=flags)


_Py = Callable[[dict[str, Any]], bool]


# Matches the database cannot do (non-ASCII names, times, integer strings), on each answer row.
def _name_matches(keyword: str, values: list[str], row: dict[str, Any]) -> bool:
    value = (row[keyword] or "").rstrip("^ ")
    return any(wildcard_match(v.rstrip("^ "), value, ignore_case=True) for v in values)


def _time_matches(keyword: str, values: list[str], row: dict[str, Any]) -> bool:
    return any(time_matches(v, row[keyword]) for v in values)


def _int_matches(keyword: str, values: list[str], row: dict[str, Any]) -> bool:
    return any(int_matches(v, row[keyword]) for v in values)


class _Builder:
    """Turns a Request into one SELECT (plus Python checks for what SQL cannot match exactly)."""

    def __init__(self, request: Request, dialect: str, found: _Found):
        self.req = request
        self.dialect = dialect
        self.found = found
        self.where: list[Any] = []
        self.python: list[_Py] = []
        self.columns: dict[str, Any] = {}  # keyword -> SQL expression returned

    # -- generic matching --

    def string(self, expr: Any, values: list[str]) -> Any:
        """Case-sensitive single value or wildcard matching; any of the values."""
        clauses = []
        exact = [v for v in values if not has_wildcard(v)]
        if exact:
            clauses.append(expr.in_(exact))
        for v in values:
            if has_wildcard(v):
                if self.dialect == "sqlite":
                    # SQLite's LIKE ignores case; GLOB does not.
                    clauses.append(expr.op("GLOB")(glob_pattern(v)))
                else:
                    clauses.append(expr.like(like_pattern(v), escape="\\"))
        return or_(*clauses)

    def match(self, keyword: str, expr: Any, kind: str, values: list[str]) -> None:
        if kind == "uid":
            self.where.append(expr.in_(values))
        elif kind == "cs":
            self.where.append(self.string(expr, values))
        elif kind == "pn":
            if all(v.isascii() for v in values):
                norm = func.lower(func.rtrim(expr, "^ "))
                clauses = []
                for v in values:
                    v = v.rstrip("^ ").lower()
                    clauses.append(norm.like(like_pattern(v), escape="\\") if has_wildcard(v) else norm == v)
                self.where.append(or_(*clauses))
            else:
                self.python.append(partial(_name_matches, keyword, values))
        elif kind == "da":
            clauses = []
            for v in values:
                if has_wildcard(v):
                    clauses.append(self.string(expr, [v]))
                    continue
                lo, hi = date_range(v)
                parts = [expr.is_not(None)]
                if lo:
                    parts.append(expr >= lo)
                if hi:
                    parts.append(expr <= hi)
                clauses.append(and_(*parts))
            self.where.append(or_(*clauses))
        elif kind == "tm":
            self.python.append(partial(_time_matches, keyword, values))
        elif kind == "is":
            self.python.append(partial(_int_matches, keyword, values))
        elif kind == "us":
            try:
                ints = [int(float(v)) for v in values]
            except ValueError:
                self.where.append(false())
            else:
                self.where.append(expr.in_(ints))

    def plain(self, keyword: str, expr: Any) -> None:
        """A key held in one column of the query's rows."""
        key = self.req.keys.get(keyword)
        if key is None:
            return
        self.columns[keyword] = expr
        if key.values is not None:
            self.match(keyword, expr, key.kind, key.values)

    # -- the levels --

    def study_keys(self) -> None:
        for keyword, col in (
            ("PatientName", Study.patient_name),
            ("PatientID", Study.patient_id),
            ("PatientBirthDate", Study.patient_birth_date),
            ("PatientSex", Study.patient_sex),
        ):
            self.plain(keyword, col)
        if self.req.level == "PATIENT":
            return
        for keyword, col in (
            ("StudyInstanceUID", Study.study_uid),
            ("StudyDate", Study.study_date),
            ("StudyTime", Study.study_time),
            ("AccessionNumber", Study.accession_number),
            ("StudyDescription", Study.study_description),
            ("ReferringPhysicianName", Study.referring_physician),
        ):
            self.plain(keyword, col)
        key = self.req.keys.get("ModalitiesInStudy")
        if key is not None and key.values is not None:
            s2 = aliased(Series)
            self.where.append(
                exists(select(s2.id).where(s2.study_id == Study.id, self.string(s2.modality, key.values)))
            )
        flags = self.req.flags
        if flags is not None and flags.values is not None:
            if flags.values == ["*"]:
                cond = exists(select(Flag.id).where(Flag.study_id == Study.id))
            else:
                # Flag kinds are lower case in the store, upper case in DICOM (CS).
                kinds = [v.lower() for v in flags.values]
                cond = exists(select(Flag.id).where(Flag.study_id == Study.id, self.string(Flag.kind, kinds)))
            self.where.append(cond)

    def series_keys(self, image_level: bool) -> None:
        for keyword, col in (
            ("SeriesInstanceUID", Series.series_uid),
            ("Modality", Series.modality),
            ("SeriesNumber", Series.series_number),
            ("SeriesDescription", Series.series_description),
        ):
            self.plain(keyword, col)
        key = self.req.keys.get("BodyPartExamined")
        if key is None or image_level:
            return
        # Any image's found value (or the header) may match; answer a value that matched.
        latest = _Latest(self.found, Series.body_part_examined)
        images = latest.join(select(latest.body_part).select_from(latest.instance)).where(
            latest.instance.series_id == Series.id, latest.body_part.is_not(None), latest.body_part != ""
        )
        if key.values is None:
            header_ok = and_(Series.body_part_examined.is_not(None), Series.body_part_examined != "")
            found = images.with_only_columns(func.min(latest.body_part)).scalar_subquery()
        else:
            header_ok = self.string(Series.body_part_examined, key.values)
            matching = images.where(self.string(latest.body_part, key.values))
            found = matching.with_only_columns(func.min(latest.body_part)).scalar_subquery()
            self.where.append(or_(header_ok, exists(matching)))
        self.columns["BodyPartExamined"] = case((header_ok, Series.body_part_examined), else_=found)

    def image_keys(self, latest: _Latest) -> None:
        inst = latest.instance
        for keyword, col in (
            ("SOPInstanceUID", inst.sop_instance_uid),
            ("SOPClassUID", inst.sop_class_uid),
            ("InstanceNumber", inst.instance_number),
            ("ImageLaterality", inst.image_laterality),
            ("Rows", inst.rows),
            ("Columns", inst.columns),
            ("ViewPosition", latest.view_position),
            ("BodyPartExamined", latest.body_part),
        ):
            self.plain(keyword, col)
        key = self.req.keys.get("ViewCodeSequence")
        if key is None:
            return
        self.columns["_code_value"] = latest.code_value
        self.columns["_code_scheme"] = latest.code_scheme
        self.columns["_code_meaning"] = latest.code_meaning
        exprs = {
            "CodeValue": latest.code_value,
            "CodingSchemeDesignator": latest.code_scheme,
            "CodeMeaning": latest.code_meaning,
        }
        for item in key.items[:1]:
            for keyword, expr in exprs.items():
                values = query_values(item.get(keyword))
                if values is not None:
                    self.where.append(self.string(expr, values))

    def build(self) -> Select:
        level = self.req.level
        if level == "PATIENT":
            self.study_keys()
            pid = func.coalesce(Study.patient_id, "")
            cols: list[ColumnElement[Any]] = [pid.label("_patient")]
            for keyword, expr in self.columns.items():
                if keyword == "PatientID":
                    continue
                cols.append(func.min(expr).label(keyword))
            if "PatientID" in self.columns:
                cols.append(func.min(Study.patient_id).label("PatientID"))
            stmt: Select = select(*cols).where(*self.where).group_by(pid).order_by(func.min(Study.id))
            return stmt
        if level == "STUDY":
            self.study_keys()
            ids = [Study.id.label("_study")]
            stmt = select(*ids)
            order = Study.id
        elif level == "SERIES":
            self.study_keys()
            self.series_keys(image_level=False)
            stmt = (
                select(Study.id.label("_study"), Series.id.label("_series"))
                .select_from(Series)
                .join(Study, Series.study_id == Study.id)
            )
            order = Series.id
        else:
            latest = _Latest(self.found, Series.body_part_examined, instance=Instance)
            self.study_keys()
            self.series_keys(image_level=True)
            self.image_keys(latest)
            newest_version = aliased(Instance)
            stmt = (
                select(Study.id.label("_study"), Series.id.label("_series"), Instance.id.label("_instance"))
                .select_from(Instance)
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
            )
            stmt = latest.join(stmt).where(
                Instance.version
                == select(func.max(newest_version.version))
                .where(newest_version.sop_instance_uid == Instance.sop_instance_uid)
                .scalar_subquery()
            )
            order = Instance.id
        stmt = stmt.add_columns(*(expr.label(k) for k, expr in self.columns.items()))
        return stmt.where(*self.where).order_by(order)


# --- answers -----------------------------------------------------------------


def _element(tag: int, vr: str, value: Any) -> DataElement:
    # Values come from headers as they were sent; answer them as they are.
    return DataElement(tag, vr, value, validation_mode=0)


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return
    vr = dictionary_VR(tag)
    if value in ("",) or value is None:
        value = None
    ds.add(_element(tag, vr, value))


def _needs_utf8(ds: Dataset) -> bool:
    for elem in ds.iterall():
        v = elem.value
        vals = v if isinstance(v, (list, MultiValue)) else [v]
        for x in vals:
            if isinstance(x, str) and not x.isascii():
                return True
            if x is not None and elem.VR == "PN" and not str(x).isascii():
                return True
    return False


# Keys computed over the answered rows, and the row id they belong to.
_AGGREGATE_OWNER = {
    "NumberOfPatientRelatedStudies": "_patient",
    "NumberOfPatientRelatedSeries": "_patient",
    "NumberOfPatientRelatedInstances": "_patient",
    "ModalitiesInStudy": "_study",
    "NumberOfStudyRelatedSeries": "_study",
    "NumberOfStudyRelatedInstances": "_study",
    "NumberOfSeriesRelatedInstances": "_series",
}


def _chunks(ids: list[Any], n: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


class Query:
    """The C-FIND SCP: parses identifiers, matches them in the store, answers."""

    def __init__(self, store: Store, max_results: int = MAX_RESULTS):
        self.store = store
        self.max_results = max_results
        self.found = _found()

    @staticmethod
    def contexts() -> list[str]:
        """The abstract syntaxes (FIND models) to add as supported contexts."""
        return [PATIENT_ROOT_FIND, STUDY_ROOT_FIND]

    # -- the pynetdicom handler --

    def handle_find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        """EVT_C_FIND handler: yields (status, identifier) pairs."""
        started = time.monotonic()
        sop_class = str(event.request.AffectedSOPClassUID or "")
        model = MODELS.get(sop_class, sop_class)
        requestor = getattr(getattr(event, "assoc", None), "requestor", None)  # only for the log line
        calling_ae = str(getattr(requestor, "ae_title", "") or "").strip()
        try:
            identifier = event.identifier
        except Exception as exc:
            log.warning(
                "query_refused",
                model=model,
                calling_ae=calling_ae,
                reason=f"cannot decode identifier: {type(exc).__name__}",
            )
            yield with_comment(UNABLE_TO_PROCESS, "cannot decode identifier"), None
            return
        try:
            request = parse_request(identifier, sop_class)
        except BadIdentifier as exc:
            log.warning("query_refused", model=model, calling_ae=calling_ae, reason=str(exc))
            yield with_comment(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        try:
            answers, truncated = self.find(request)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            # The message of the driver only: SQLAlchemy's own would quote the bound values.
            reason = f"{type(orig).__name__}: {str(orig).splitlines()[0] if str(orig) else ''}"
            log.error("query_failed", model=model, query_level=request.level, calling_ae=calling_ae, error=reason[:200])
            yield with_comment(DATABASE_ERROR, f"database error: {reason}"), None
            return
        except Exception as exc:
            log.error(
                "query_failed", model=model, query_level=request.level, calling_ae=calling_ae, error=type(exc).__name__
            )
            yield with_comment(UNABLE_TO_PROCESS, f"unable to process: {type(exc).__name__}"), None
            return
        sent = 0
        cancelled = False
        for ds in answers:
            if event.is_cancelled:
                cancelled = True
                break
            yield PENDING, ds
            sent += 1
        fields = {
            "model": model,
            "query_level": request.level,
            "keys": request.used(),
            "matches": len(answers),
            "calling_ae": calling_ae,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if cancelled:
            log.info("query", **fields, sent=sent, cancelled=True)
            yield CANCEL, None
            return
        log.info("query", **fields, truncated=truncated)
        if truncated:
            log.warning(
                "query_truncated", model=model, query_level=request.level, limit=self.max_results, calling_ae=calling_ae
            )

    # -- the work --

    def find(self, request: Request) -> tuple[list[Dataset], bool]:
        """The answers to a request (at most max_results), and whether more matched."""
        builder = _Builder(request, self.store.engine.dialect.name, self.found)
        stmt = builder.build()
        rows: list[dict[str, Any]] = []
        truncated = False
        with self.store.read() as s:
            if not builder.python:
                stmt = stmt.limit(self.max_results + 1)
                result: Iterable[Any] = s.execute(stmt)
            else:
                result = s.execute(stmt.execution_options(yield_per=500))
            for row in result:
                m = row._asdict()
                if all(check(m) for check in builder.python):
                    if len(rows) == self.max_results:
                        truncated = True
                        break
                    rows.append(m)
            result.close()  # type: ignore[attr-defined]
            extras = self._aggregates(s, request, rows)
        return [self._answer(request, row, extras) for row in rows], truncated

    def _aggregates(self, s: Any, request: Request, rows: list[dict[str, Any]]) -> dict[str, dict[Any, Any]]:
        """Counts, modalities and flags of the answered studies, series and patients, as asked."""
        asked = set(request.keys)
        out: dict[str, dict[Any, Any]] = {}
        if not rows:
            return out
        if request.level == "PATIENT":
            pids = sorted({r["_patient"] for r in rows})
            pid = func.coalesce(Study.patient_id, "")
            wanted = {
                "NumberOfPatientRelatedStudies": func.count(distinct(Study.id)),
                "NumberOfPatientRelatedSeries": func.count(distinct(Series.id)),
                "NumberOfPatientRelatedInstances": func.count(distinct(Instance.sop_instance_uid)),
            }
            for keyword, agg in wanted.items():
                if keyword not in asked:
                    continue
                counts: dict[Any, Any] = {}
                for chunk in _chunks(pids):
                    q: Select = select(pid, agg).select_from(Study)
                    if keyword != "NumberOfPatientRelatedStudies":
                        q = q.join(Series, Series.study_id == Study.id)
                    if keyword == "NumberOfPatientRelatedInstances":
                        q = q.join(Instance, Instance.series_id == Series.id)
                    counts.update(s.execute(q.where(pid.in_(chunk)).group_by(pid)).all())
                out[keyword] = counts
            return out
        studies = sorted({r["_study"] for r in rows})
        if "ModalitiesInStudy" in asked:
            mods: dict[Any, Any] = defaultdict(list)
            for chunk in _chunks(studies):
                q = (
                    select(Series.study_id, Series.modality)
                    .where(Series.study_id.in_(chunk), Series.modality.is_not(None))
                    .distinct()
                )
                for sid, modality in s.execute(q):
                    mods[sid].append(modality)
            out["ModalitiesInStudy"] = {k: sorted(set(v)) for k, v in mods.items()}
        if "NumberOfStudyRelatedSeries" in asked:
            counts = {}
            for chunk in _chunks(studies):
                q = (
                    select(Series.study_id, func.count(Series.id))
                    .where(Series.study_id.in_(chunk))
                    .group_by(Series.study_id)
                )
                counts.update(s.execute(q).all())
            out["NumberOfStudyRelatedSeries"] = counts
        if "NumberOfStudyRelatedInstances" in asked:
            counts = {}
            for chunk in _chunks(studies):
                q = (
                    select(Series.study_id, func.count(distinct(Instance.sop_instance_uid)))
                    .join(Instance, Instance.series_id == Series.id)
                    .where(Series.study_id.in_(chunk))
                    .group_by(Series.study_id)
                )
                counts.update(s.execute(q).all())
            out["NumberOfStudyRelatedInstances"] = counts
        if request.flags is not None:
            kinds: dict[Any, Any] = defaultdict(set)
            for chunk in _chunks(studies):
                for sid, kind in s.execute(select(Flag.study_id, Flag.kind).where(Flag.study_id.in_(chunk)).distinct()):
                    kinds[sid].add(kind.upper())
            out[MISMATCH_FLAGS] = {k: sorted(v) for k, v in kinds.items()}
        if "NumberOfSeriesRelatedInstances" in asked and request.level in ("SERIES", "IMAGE"):
            series = sorted({r["_series"] for r in rows})
            counts = {}
            for chunk in _chunks(series):
                q = (
                    select(Instance.series_id, func.count(distinct(Instance.sop_instance_uid)))
                    .where(Instance.series_id.in_(chunk))
                    .group_by(Instance.series_id)
                )
                counts.update(s.execute(q).all())
            out["NumberOfSeriesRelatedInstances"] = counts
        return out

    def _answer(self, request: Request, row: dict[str, Any], extras: dict[str, dict[Any, Any]]) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = request.level
        owner = _AGGREGATE_OWNER
        for keyword, key in request.keys.items():
            if key.kind == "seq":
                ds.add(_element(key.tag, "SQ", self._code_sequence(key, row)))
            elif key.kind == "unsupported" or key.kind == "empty":
                ds.add(_element(key.tag, key.vr, [] if key.vr == "SQ" else None))
            elif keyword in owner:
                value = extras.get(keyword, {}).get(row.get(owner[keyword]))
                if value is None and key.kind == "count":
                    value = 0
                _put(ds, keyword, value if value != [] else None)
            elif keyword in row:
                value = row[keyword]
                _put(ds, keyword, value if value != "" else None)
        if request.flags is not None:
            block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            kinds = extras.get(MISMATCH_FLAGS, {}).get(row.get("_study")) or None
            block.add_new(MISMATCH_FLAGS_OFFSET, "CS", kinds)
        if _needs_utf8(ds):
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def _code_sequence(self, key: _Key, row: dict[str, Any]) -> Sequence:
        value = row.get("_code_value")
        if not value:
            return Sequence()
        found = {
            "CodeValue": value,
            "CodingSchemeDesignator": row.get("_code_scheme"),
            "CodeMeaning": row.get("_code_meaning"),
        }
        asked = [k for k in _CODE_ITEM_KEYS if key.items and k in key.items[0]] or list(_CODE_ITEM_KEYS)
        item = Dataset()
        for keyword in asked:
            _put(item, keyword, found[keyword])
        return Sequence([item])
