"""Dataset manifests for training and evaluation: which file, which class, which source.

A label that is wrong teaches the model the wrong thing and nobody sees it, so
labels from DICOM headers are taken only when the headers agree: every source
of evidence (procedure codes, Body Part Examined with View Position, each
description field) names the classes it allows, and a file is labelled only
when together they leave exactly one. Files with no evidence are ``unmapped``,
files whose headers disagree are ``conflicting``; both are reported with what
was seen and left out, never guessed.

The source group of every file is kept so that evaluation can hold out whole
sources: every class of the shared radiographs comes from one source, and a
model can learn the source instead of the anatomy. For the store the group is
the sender (the calling AE title the store recorded for the association), or
the header's Institution Name or Station Name (``group_by``), so that a
department can hold out whole senders; a group value that repeats the
patient's name or ID is withheld, never written.

DICOM files are checked through :func:`nnrouter.pixels.decode.decode_file`, the
workers' decode path, so a file that serving could not show is not trained on.

Manifest paths are absolute: the shared data must be read where it lies, not
copied, and the trainer opens ``file`` as it is.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import cv2
import pydicom
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select

from nnrouter.core import config, yamlfile
from nnrouter.core.codes import LN
from nnrouter.core.codes import classes as view_classes
from nnrouter.core.store import Instance, InstanceState, Store
from nnrouter.pixels.decode import DecodeError, decode_file

__all__ = [
    "GROUP_BY",
    "Decision",
    "Entry",
    "Found",
    "LabelRules",
    "Rejected",
    "Rules",
    "Summary",
    "build",
    "decide",
    "from_class_folders",
    "from_dicom",
    "from_store",
    "load_rules",
    "source_group",
    "split_groups",
    "summary_path",
]

OTHER = "other"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
MANIFEST_COLUMNS = ("file", "label", "group", "kind")
# The size the decode check asks for: small, so checking is cheap, through the
# same chain (modality LUT, VOI, polarity) that serving uses at any size.
CHECK_SIDE = 256

# View Position cannot say "Lauenstein": that view is a frog-leg patient
# position, and HIP + AP is far more often a plain AP hip. classes.csv lists
# HIP/AP for it, so the built-in pair table leaves it out; codes and
# descriptions ("lauenstein", "frog") still map it.
_VIEW_POSITION_NOT_ENOUGH = frozenset({"oblique_view_of_Lauenstein"})

# Header fields whose text is matched against the description patterns; each
# one is its own source of evidence (a series can be narrower than its study).
_DESCRIPTION_FIELDS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
_CODE_SEQUENCES = ("RequestedProcedureCodeSequence", "ProcedureCodeSequence")
# What a report may show of a header: acquisition facts, never who the patient is.
_SEEN_FIELDS = ("Modality", "BodyPartExamined", "ViewPosition", *_DESCRIPTION_FIELDS)
_SOURCE_FIELDS = ("InstitutionName", "Manufacturer", "StationName")
# What a store instance's source group can be: the sender, or the header's site or machine.
GROUP_BY = ("calling_ae", "institution", "station")
_GROUP_FIELD = {"institution": "InstitutionName", "station": "StationName"}
_GROUP_PREFIX = {"calling_ae": "AE", "institution": "institution", "station": "station"}
_LOINC_SCHEMES = frozenset({"LN", "LOINC", ""})


# --------------------------------------------------------------------------
# The mapping file (rules/labels.yaml)


def _class_name(value: str) -> str:
    known = view_classes()
    if value != OTHER and value not in known:
        raise ValueError(f"{value!r} is not one of the {len(known)} classes or {OTHER!r}")
    return value


def _term(value: str) -> str:
    """DICOM code strings compare upper case without padding."""
    value = value.strip().upper()
    if not value:
        raise ValueError("must not be empty")
    return value


ClassName = Annotated[str, AfterValidator(_class_name)]
Term = Annotated[str, AfterValidator(_term)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CodeRule(_Strict):
    """A local procedure code. List a code once per class a multi-view procedure yields."""

    code: str
    scheme: str | None = None  # Coding Scheme Designator; None matches any scheme
    label: ClassName = Field(alias="class")


class ViewRule(_Strict):
    body_part: Term
    view_positions: list[Term] = Field(min_length=1)
    label: ClassName = Field(alias="class")


def _regex(value: str) -> str:
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


class DescriptionRule(_Strict):
    pattern: str
    label: ClassName = Field(alias="class")

    _compiles = field_validator("pattern")(_regex)


class BodyPartRule(_Strict):
    """A description that names an anatomy ("XR Wrist Lt"): it narrows like Body Part Examined, never picks."""

    pattern: str
    body_part: Term

    _compiles = field_validator("pattern")(_regex)


class LabelRules(_Strict):
    """What ``rules/labels.yaml`` may say; classes.csv's codes and pairs are built in."""

    body_part_aliases: dict[Term, Term] = {}
    codes: list[CodeRule] = []
    views: list[ViewRule] = []
    descriptions: list[DescriptionRule] = []
    description_body_parts: list[BodyPartRule] = []


@dataclass(frozen=True)
class Rules:
    """The mapping ready to apply: built-in tables merged with the file's additions."""

    body_parts: dict[str, frozenset[str]]  # Body Part Examined -> the classes of that anatomy
    aliases: dict[str, str]
    pairs: dict[tuple[str, str], str]  # (body part, view position) -> class
    codes: dict[str, dict[str, frozenset[str]]]  # code value -> scheme ("*" = any) -> classes
    descriptions: tuple[tuple[re.Pattern[str], str], ...]
    # Descriptions that name an anatomy -> that Body Part Examined's term.
    description_parts: tuple[tuple[re.Pattern[str], str], ...] = ()
    source: str = ""  # the file, for reports
    sha256: str = ""


def load_rules(path: Path) -> Rules:
    """Read and check the mapping; raises yamlfile.FileProblems naming file, line and field.

    Checks that need the whole file (a pair's body part against its class,
    a pair that contradicts another) are done here, after the schema, so that
    they can still point at the line.
    """
    path = Path(path)
    spec: LabelRules = yamlfile.validate(LabelRules, path)  # type: ignore[assignment]
    table = view_classes()
    known_parts = {c.body_part_examined for c in table.values()}

    body_parts: dict[str, set[str]] = {}
    pairs: dict[tuple[str, str], str] = {}
    pair_origin: dict[tuple[str, str], str] = {}
    code_map: dict[str, dict[str, set[str]]] = {}
    for c in table.values():
        body_parts.setdefault(c.body_part_examined, set()).add(c.name)
        if c.view_position and c.name not in _VIEW_POSITION_NOT_ENOUGH:
            pairs[(c.body_part_examined, c.view_position)] = c.name
            pair_origin[(c.body_part_examined, c.view_position)] = "classes.csv"
        for code in c.order_codes:
            code_map.setdefault(code.value, {}).setdefault(code.scheme, set()).add(c.name)

    problems: list[tuple[tuple, str, str]] = []  # (yaml path, field, reason)
    for alias, target in spec.body_part_aliases.items():
        if target not in known_parts:
            problems.append(
                (
                    ("body_part_aliases", alias),
                    f"body_part_aliases.{alias}",
                    f"{target} is not a Body Part Examined of any class ({', '.join(sorted(known_parts))})",
                )
            )
    aliases = dict(spec.body_part_aliases)

    for i, rule in enumerate(spec.views):
        part = aliases.get(rule.body_part, rule.body_part)
        if rule.label != OTHER and table[rule.label].body_part_examined != part:
            problems.append(
                (
                    ("views", i, "body_part"),
                    f"views[{i}].body_part",
                    f"{rule.body_part} is not the body part of {rule.label} ({table[rule.label].body_part_examined})",
                )
            )
            continue
        for view in rule.view_positions:
            key = (part, view)
            if key in pairs and pairs[key] != rule.label:
                problems.append(
                    (
                        ("views", i, "view_positions"),
                        f"views[{i}].view_positions",
                        f"{part} + {view} already maps to {pairs[key]} ({pair_origin[key]})",
                    )
                )
                continue
            pairs[key] = rule.label
            pair_origin[key] = f"views[{i}]"

    for i, part_rule in enumerate(spec.description_body_parts):
        if part_rule.body_part not in known_parts:
            problems.append(
                (
                    ("description_body_parts", i, "body_part"),
                    f"description_body_parts[{i}].body_part",
                    f"{part_rule.body_part} is not a Body Part Examined of any class "
                    f"({', '.join(sorted(known_parts))})",
                )
            )

    for code_rule in spec.codes:
        code_map.setdefault(code_rule.code.strip(), {}).setdefault(
            (code_rule.scheme or "*").strip().upper(), set()
        ).add(code_rule.label)

    if problems:
        _, positions = yamlfile.load(path)
        located = []
        for where, name, reason in problems:
            line, col = positions.get(where, (None, None))
            located.append(yamlfile.Problem(str(path), line, col, name, reason))
        raise yamlfile.FileProblems(located)

    return Rules(
        body_parts={k: frozenset(v) for k, v in body_parts.items()},
        aliases=aliases,
        pairs=pairs,
        codes={k: {s: frozenset(v) for s, v in by.items()} for k, by in code_map.items()},
        descriptions=tuple((re.compile(r.pattern, re.IGNORECASE), r.label) for r in spec.descriptions),
        description_parts=tuple(
            (re.compile(r.pattern, re.IGNORECASE), r.body_part) for r in spec.description_body_parts
        ),
        source=str(path),
        sha256=_sha256(path),
    )


# --------------------------------------------------------------------------
# Deciding a label from one header


@dataclass(frozen=True)
class Evidence:
    source: str  # "RequestedProcedureCodeSequence", "BodyPartExamined+ViewPosition", "StudyDescription", ...
    value: str
    classes: frozenset[str]
    decides: bool  # False for a body part alone: it narrows, it never picks

    def __str__(self) -> str:
        return f"{self.source} {self.value!r} -> {'|'.join(sorted(self.classes))}"


@dataclass(frozen=True)
class Decision:
    outcome: str  # "mapped", "unmapped" or "conflicting"
    label: str | None
    reason: str
    evidence: tuple[str, ...]  # what named a class, for mapped and conflicting
    seen: dict[str, str]  # header values looked at (no patient data), for unmapped


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = " ".join(str(value).split())
    return text[:128]


def _normalised(text: str) -> str:
    # Protocol names write "Thorax_pa" and "CHEST^PA": let \b see words.
    return " ".join(re.sub(r"[_^]", " ", text).split())


def _header_codes(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(sequence, value, scheme, meaning) of every procedure code in the header."""
    out = []
    for seq in _CODE_SEQUENCES:
        for item in ds.get(seq) or []:
            value = _text(item, "CodeValue") or _text(item, "LongCodeValue")
            if value:
                out.append((seq, value, _text(item, "CodingSchemeDesignator").upper(), _text(item, "CodeMeaning")))
    return out


def _code_classes(rules: Rules, value: str, scheme: str) -> set[str]:
    by_scheme = rules.codes.get(value, {})
    found = set(by_scheme.get("*", ()))
    found |= by_scheme.get(scheme, set())
    if scheme in _LOINC_SCHEMES:  # built-in codes are LOINC; a missing scheme is taken as LOINC
        found |= by_scheme.get(LN, set())
    return found


def decide(ds: Dataset, rules: Rules) -> Decision:
    """The class the header names, or why it names none or several."""
    seen = {k: v for k in _SEEN_FIELDS if (v := _text(ds, k))}
    evidence: list[Evidence] = []

    header_codes = _header_codes(ds)
    if header_codes:
        seen["ProcedureCodes"] = "; ".join(dict.fromkeys(f"{s or '?'} {v}" for _, v, s, _ in header_codes))
    for seq in _CODE_SEQUENCES:
        items = [(v, s) for q, v, s, _ in header_codes if q == seq]
        named: set[str] = set()
        for value, scheme in items:
            named |= _code_classes(rules, value, scheme)
        if named:
            evidence.append(Evidence(seq, ", ".join(v for v, _ in items), frozenset(named), True))

    raw_part = _text(ds, "BodyPartExamined").upper()
    part = rules.aliases.get(raw_part, raw_part)
    view = _text(ds, "ViewPosition").upper()
    if part in rules.body_parts:
        evidence.append(Evidence("BodyPartExamined", raw_part, rules.body_parts[part], False))
    if part and view and (part, view) in rules.pairs:
        evidence.append(
            Evidence(
                "BodyPartExamined+ViewPosition", f"{raw_part}/{view}", frozenset({rules.pairs[(part, view)]}), True
            )
        )

    texts = [(k, _text(ds, k)) for k in _DESCRIPTION_FIELDS]
    texts += [(f"{q} meaning", m) for q, _, _, m in header_codes if m]
    for name, text in texts:
        if not text:
            continue
        plain = _normalised(text)
        named = {label for pattern, label in rules.descriptions if pattern.search(plain)}
        if named:
            evidence.append(Evidence(name, text, frozenset(named), True))
        # The anatomy a description names narrows like Body Part Examined, so
        # "XR Wrist Lt" on a film whose header says HAND is reported as a
        # conflict rather than quietly labelled a hand.
        parts = {p for pattern, p in rules.description_parts if pattern.search(plain)}
        if parts:
            evidence.append(
                Evidence(f"{name} anatomy", text, frozenset().union(*(rules.body_parts[p] for p in parts)), False)
            )

    shown = tuple(str(e) for e in evidence)
    allowed = frozenset.intersection(*(e.classes for e in evidence)) if evidence else frozenset()
    if evidence and not allowed:
        return Decision("conflicting", None, "headers disagree: " + "; ".join(shown), shown, seen)
    if not any(e.decides for e in evidence):
        if part in rules.body_parts and view:
            why = f"Body Part Examined {raw_part} with View Position {view} names none of its classes"
        elif part in rules.body_parts:
            why = f"Body Part Examined {raw_part} without a View Position or description that names the view"
        else:
            why = "no procedure code, body part with view position, or description names a class"
        return Decision("unmapped", None, why, shown, seen)
    if len(allowed) > 1:
        return Decision(
            "unmapped",
            None,
            f"evidence allows several classes ({', '.join(sorted(allowed))}): " + "; ".join(shown),
            shown,
            seen,
        )
    (label,) = allowed
    return Decision("mapped", label, "", shown, seen)


# --------------------------------------------------------------------------
# Collecting entries


@dataclass(frozen=True)
class Entry:
    """One manifest row; ``evidence`` says why it has its label (not written to the CSV)."""

    file: str
    label: str
    group: str
    kind: str  # "image" or "dicom"
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A file (or a whole folder) left out, and why, so a person can fix the source."""

    file: str
    outcome: str  # "unmapped", "conflicting", "undecodable", "unreadable" or "duplicate"
    reason: str
    details: tuple[str, ...] = ()


@dataclass
class Found:
    entries: list[Entry] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: Found) -> None:
        self.entries += other.entries
        self.rejected += other.rejected
        self.notes += other.notes


def from_class_folders(root: Path, *, check_decode: bool = True) -> Found:
    """Label = folder name; group = MANIFEST.csv's ``repo`` when there is one, else the folder."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise yamlfile.FileProblems([yamlfile.Problem(str(root), None, None, "", "not a folder")])
    known = set(view_classes()) | {OTHER}
    groups, notes = _read_groups(root)
    found = Found(notes=notes)
    fallback = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if folder.name not in known:
            found.rejected.append(
                Rejected(
                    str(folder),
                    "unmapped",
                    f"folder name {folder.name!r} is not one of the classes or {OTHER!r} ({len(files)} files left out)",
                )
            )
            continue
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                found.rejected.append(Rejected(str(f), "unreadable", "not a PNG or JPEG file"))
                continue
            rel = f.relative_to(root).as_posix()
            listed = groups.get(rel)
            if listed is not None and listed[1] != folder.name:
                found.rejected.append(
                    Rejected(
                        str(f), "conflicting", f"MANIFEST.csv says class {listed[1]!r}, the folder says {folder.name!r}"
                    )
                )
                continue
            if listed is None:
                fallback += 1
            group = listed[0] if listed is not None else folder.name
            found.entries.append(Entry(str(f), folder.name, group, "image", (f"folder {folder.name}",)))
    if not groups:
        found.notes.append(
            f"{root}: no MANIFEST.csv, so each class folder is taken as one source (group = folder name)"
        )
    elif fallback:
        found.notes.append(f"{root}: {fallback} images are not in MANIFEST.csv; their group is their folder name")
    if check_decode:
        found.entries = _check_images(found.entries, found.rejected)
    return found


def _read_groups(root: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """MANIFEST.csv's file -> (repo, class); several repos for one file are joined with '+'."""
    path = root / "MANIFEST.csv"
    if not path.is_file():
        return {}, []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file", "class", "repo") if c not in (reader.fieldnames or [])]
        if missing:
            raise yamlfile.FileProblems([yamlfile.Problem(str(path), 1, 1, ", ".join(missing), "column missing")])
        rows = list(reader)
    repos: dict[str, set[str]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        repos.setdefault(row["file"], set()).add(row["repo"])
        labels[row["file"]] = row["class"]
    notes = []
    repeated = len(rows) - len(repos)
    if repeated:
        notes.append(f"{path}: {repeated} rows repeat a file listed before (counted once)")
    absent = sum(not (root / name).is_file() for name in repos)
    if absent:
        notes.append(f"{path}: {absent} listed files are absent")
    return {k: ("+".join(sorted(v)), labels[k]) for k, v in repos.items()}, notes


def _check_images(entries: list[Entry], rejected: list[Rejected]) -> list[Entry]:
    """Open every image the way the trainer does (cv2, grey), in threads: cv2 lets go of the GIL."""

    def readable(entry: Entry) -> bool:
        return cv2.imread(entry.file, cv2.IMREAD_GRAYSCALE) is not None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(readable, entries))
    for entry, good in zip(entries, ok):
        if not good:
            rejected.append(Rejected(entry.file, "undecodable", "OpenCV cannot read this image"))
    return [e for e, good in zip(entries, ok) if good]


def _walk(paths: Iterable[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"
            )
        elif p.exists():
            out.append(p)
        else:
            raise yamlfile.FileProblems([yamlfile.Problem(str(p), None, None, "", "no such file or folder")])
    return out


def _group(ds: Dataset, path: Path) -> str:
    """The equipment that made the image, so that evaluation can hold out whole sources."""
    parts = [t for k in _SOURCE_FIELDS if (t := "".join(c for c in _text(ds, k) if c.isprintable()))]
    return " | ".join(parts) if parts else f"folder {path.parent}"


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable()).strip()


def _names_patient(ds: Dataset, value: str) -> bool:
    """A modality that writes the patient into Station Name (it happens) must not leak it into a manifest."""
    folded = value.casefold()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs"):
        text = _text(ds, keyword)
        parts = [text, text.replace("^", " ").strip(), *text.split("^")]
        if any(len(p) >= 3 and p.casefold() in folded for p in parts if p.strip()):
            return True
    return False


def source_group(ds: Dataset, group_by: str, calling_ae: str | None) -> str:
    """The source group of a stored instance: ``AE <title>``, ``institution <name>`` or ``station <name>``.

    An instance without the value gets ``<kind> (not recorded)``: one group of
    its own, held out as a whole like any other.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
    value = _printable(calling_ae or "") if group_by == "calling_ae" else _printable(_text(ds, _GROUP_FIELD[group_by]))
    prefix = _GROUP_PREFIX[group_by]
    if not value:
        return f"{prefix} (not recorded)"
    if _names_patient(ds, value):
        return f"{prefix} (withheld: names the patient)"
    return f"{prefix} {value}"


def from_dicom(
    paths: Iterable[Path],
    rules: Rules,
    *,
    check_decode: bool = True,
    group: Callable[[Dataset, Path], str] | None = None,
) -> Found:
    """Label DICOM files (or folders of them) from their headers; decode-check the labelled ones.

    ``group`` names a file's source group from its header and path; by default
    the equipment that made it.
    """
    found = Found()
    seen_uids: dict[str, str] = {}
    done: set[Path] = set()
    for path in _walk(paths):
        path = path.resolve()
        if path in done:
            continue
        done.add(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many types on damaged files
            found.rejected.append(Rejected(str(path), "unreadable", f"not a readable DICOM file: {type(exc).__name__}"))
            continue
        if "SOPClassUID" not in ds and "Modality" not in ds:
            found.rejected.append(Rejected(str(path), "unreadable", "not a DICOM image (no SOP Class UID or Modality)"))
            continue
        decision = decide(ds, rules)
        if decision.outcome != "mapped":
            details = (
                decision.evidence
                if decision.outcome == "conflicting"
                else tuple(f"{k}={v}" for k, v in decision.seen.items())
            )
            found.rejected.append(Rejected(str(path), decision.outcome, decision.reason, details))
            continue
        uid = _text(ds, "SOPInstanceUID")
        if uid and uid in seen_uids:
            found.rejected.append(Rejected(str(path), "duplicate", f"same SOP Instance UID as {seen_uids[uid]}"))
            continue
        if uid:
            seen_uids[uid] = str(path)
        found.entries.append(
            Entry(str(path), decision.label or "", (group or _group)(ds, path), "dicom", decision.evidence)
        )
    if check_decode:
        found.entries = _check_dicom(found.entries, found.rejected)
    return found


def _check_dicom(entries: list[Entry], rejected: list[Rejected]) -> list[Entry]:
    kept = []
    for entry in entries:
        try:
            decode_file(entry.file, max_side=CHECK_SIDE)
        except DecodeError as exc:
            rejected.append(Rejected(entry.file, "undecodable", exc.reason))
            continue
        kept.append(entry)
    return kept


def from_store(
    settings: config.Settings, rules: Rules, *, check_decode: bool = True, group_by: str = "calling_ae"
) -> Found:
    """The store's instances whose file is still there: the newest version of each SOP Instance.

    Instances a worker already found undecodable are reported with the
    worker's reason instead of being read again. The source group is the
    calling AE title the store recorded for the association (``group_by``
    "calling_ae"), or the header's Institution Name or Station Name, which the
    store does not keep and are read from the file.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
    url = settings.database.url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.split("///", 1)[1])
        if not db.is_file():
            raise yamlfile.FileProblems(
                [yamlfile.Problem(str(db), None, None, "database.url", "no database file here")]
            )
    store = Store(url)
    try:
        store.require_current()
        with store.read() as s:
            rows = s.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.version,
                    Instance.path,
                    Instance.state,
                    Instance.state_reason,
                    Instance.calling_ae,
                ).order_by(Instance.sop_instance_uid, Instance.version)
            ).all()
    finally:
        store.dispose()
    newest = {uid: (path, state, reason) for uid, _v, path, state, reason, _ae in rows}
    sender = {Path(path).resolve(): ae for _uid, _v, path, _s, _r, ae in rows}
    found = Found()
    superseded = len(rows) - len(newest)
    if superseded:
        found.notes.append(f"store: {superseded} older versions of re-sent instances left out")
    paths = []
    for path, state, reason in newest.values():
        if state == InstanceState.UNDECODABLE:
            found.rejected.append(Rejected(path, "undecodable", reason or "recorded undecodable by a worker"))
        elif not Path(path).is_file():
            found.rejected.append(Rejected(path, "unreadable", "the store names this file but it is gone"))
        else:
            paths.append(Path(path))
    found.extend(
        from_dicom(
            sorted(paths),
            rules,
            check_decode=check_decode,
            group=lambda ds, path: source_group(ds, group_by, sender.get(path)),
        )
    )
    return found


# --------------------------------------------------------------------------
# Writing the manifest and its summary


@dataclass
class Summary:
    """What went into the manifest and what did not, for the person who builds it and the model card."""

    manifest: Path
    sha256: str
    labels: dict[str, int]
    groups: dict[str, int]
    sources: dict[str, dict[str, int]]  # label -> group -> images
    rejected: list[Rejected]
    notes: list[str]
    mapping: str = ""
    mapping_sha256: str = ""

    @property
    def total(self) -> int:
        return sum(self.labels.values())

    def outcomes(self) -> dict[str, int]:
        return dict(Counter(r.outcome for r in self.rejected))

    def to_json(self) -> dict:
        by_outcome: dict[str, list[dict]] = {}
        for r in self.rejected:
            by_outcome.setdefault(r.outcome, []).append(
                {"file": r.file, "reason": r.reason, "details": list(r.details)}
            )
        return {
            "manifest": str(self.manifest),
            "manifest_sha256": self.sha256,
            "entries": self.total,
            "labels": self.labels,
            "groups": self.groups,
            "sources_per_label": self.sources,
            "mapping": self.mapping,
            "mapping_sha256": self.mapping_sha256,
            "left_out": {k: len(v) for k, v in by_outcome.items()},
            **by_outcome,
            "notes": self.notes,
        }

    def text(self, limit: int = 20) -> str:
        lines = [
            f"{self.manifest}: {self.total} files, {len(self.labels)} classes, "
            f"{len(self.groups)} source groups (sha256 {self.sha256[:16]})"
        ]
        for label, n in self.labels.items():
            groups = self.sources[label]
            lines.append(f"  {label:<32} {n:>6}  from {len(groups)} source{'s' if len(groups) != 1 else ''}")
        for outcome, n in sorted(self.outcomes().items()):
            lines.append(f"{outcome}: {n}")
            shown = [r for r in self.rejected if r.outcome == outcome][:limit]
            lines += [f"  {r.file}: {r.reason}" for r in shown]
            if n > len(shown):
                lines.append(f"  ... {n - len(shown)} more in the summary file")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def summary_path(manifest: Path) -> Path:
    return Path(manifest).with_name(Path(manifest).name + ".summary.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(out: Path, found: Found, rules: Rules | None) -> Summary:
    """Manifest then summary, each written whole and renamed into place."""
    unique: dict[str, Entry] = {}
    for e in found.entries:
        unique.setdefault(e.file, e)
    if len(unique) < len(found.entries):
        found.notes.append(f"{len(found.entries) - len(unique)} files came from more than one input (listed once)")
    entries = sorted(unique.values(), key=lambda e: (e.kind, e.label, e.file))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows((e.file, e.label, e.group, e.kind) for e in entries)
    os.replace(tmp, out)

    labels = Counter(e.label for e in entries)
    sources: dict[str, Counter] = {}
    for e in entries:
        sources.setdefault(e.label, Counter())[e.group] += 1
    summary = Summary(
        manifest=out.resolve(),
        sha256=_sha256(out),
        labels=dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        groups=dict(sorted(Counter(e.group for e in entries).items(), key=lambda kv: (-kv[1], kv[0]))),
        sources={k: dict(sorted(v.items())) for k, v in sorted(sources.items())},
        rejected=sorted(found.rejected, key=lambda r: (r.outcome, r.file)),
        notes=found.notes,
        mapping=rules.source if rules else "",
        mapping_sha256=rules.sha256 if rules else "",
    )
    side = summary_path(out)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, side)
    return summary


def split_groups(values: Iterable[str], known: set[str]) -> list[str]:
    """Group names as given on a command line: ``G1,G2``, or one name that has a comma in it."""
    out: list[str] = []
    for value in values:
        out += [value] if value in known else [g.strip() for g in value.split(",") if g.strip()]
    return list(dict.fromkeys(out))


def build(
    out: Path,
    *,
    images: Path | None = None,
    dicom: list[Path] | None = None,
    store_config: Path | None = None,
    mapping: Path = Path("rules/labels.yaml"),
    check_decode: bool = True,
    group_by: str = "calling_ae",
    exclude_groups: Iterable[str] = (),
) -> Summary:
    """Write the manifest ``out`` and ``<out>.summary.json`` from any of the three inputs.

    The mapping is read (and checked) only when DICOM is an input: class
    folders carry their labels in their names. ``group_by`` names the store's
    source groups; ``exclude_groups`` leaves whole groups out, for a training
    manifest whose held-out sources ``nnrouter models promote`` can then
    compare models on. A group that no file has is an error: a misspelt name
    would otherwise train on the source meant to be held out.
    """
    if images is None and not dicom and store_config is None:
        raise ValueError("nothing to build from: give class folders, DICOM files or the store")
    found = Found()
    rules = None
    if dicom or store_config is not None:
        rules = load_rules(mapping)
    if images is not None:
        found.extend(from_class_folders(images, check_decode=check_decode))
    if dicom:
        assert rules is not None  # loaded above whenever DICOM is an input
        found.extend(from_dicom(dicom, rules, check_decode=check_decode))
    if store_config is not None:
        assert rules is not None  # loaded above whenever the store is an input
        found.extend(
            from_store(
                config.load(store_config),
                rules,
                check_decode=check_decode,
                group_by=group_by,
            )
        )
    present = Counter(e.group for e in found.entries)
    excluded = set(split_groups(exclude_groups, set(present)))
    if excluded:
        missing = sorted(excluded - set(present))
        if missing:
            raise ValueError(
                f"no file is in group(s) {', '.join(map(repr, missing))}; the groups are: "
                + ", ".join(map(repr, sorted(present)))
            )
        found.entries = [e for e in found.entries if e.group not in excluded]
        found.notes.append(
            "held out of this manifest (--exclude-groups): "
            + ", ".join(f"{g} ({present[g]} files)" for g in sorted(excluded))
        )
    if not check_decode:
        found.notes.append("decode check skipped (--no-check-decode): some files may not decode in training")
    return _write(out, found, rules)
