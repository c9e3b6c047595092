"""Hanging protocols: which radiograph goes where on the reading screen.

A radiologist reads a knee series faster when the frontal view is always on
the left, the lateral beside it and last year's knee next to today's. Viewers
do that from hanging protocols; nnrouter knows each image's view class, so it
can both lay out a study itself and hand viewers standard protocols that do
the same from the headers the router writes.

Two parts, both driven by the class table (``nnrouter/data/classes.csv``):

* :func:`layout` orders one study's classified images (and a prior's) into
  display sets on a screen grid; :func:`pick_prior` chooses that prior.
* :func:`protocol_for` / :func:`generic_protocols` build Hanging Protocol
  Storage instances (PS3.3 A.44) per body region; :func:`write_protocols`
  writes them as Part 10 files.

The Hanging Protocol Information Model FIND (PS3.4 Annex U) over those
instances is a network service and lives with the others, in
``nnrouter.dicom.protocols_find``; view families come from the class table
(``nnrouter.core.codes.family``).

The conventions encoded here: frontal before lateral before oblique before
special views; for both sides of one view, the patient's right on the
viewer's left (as if facing the patient); unclassified images last, never
mixed into a classified display set; the prior beside the current, like
with like.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import Collection
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pynetdicom.sop_class import (
    HangingProtocolInformationModelFind,
    HangingProtocolStorage,
)

from nnrouter.core.codes import (
    DECUBITUS_POSITIONS,
    FAMILIES,
    FRONTAL_POSITIONS,
    LATERAL_POSITIONS,
    UNKNOWN,
    Code,
    ViewClass,
    family,
    sct_meaning,
)
from nnrouter.core.codes import classes as view_classes

__all__ = [
    "FAMILIES",
    "HANGING_PROTOCOL_FIND",
    "HANGING_PROTOCOL_STORAGE",
    "UNKNOWN",
    "DisplaySet",
    "ImageView",
    "Layout",
    "StudyViews",
    "family",
    "generic_protocols",
    "layout",
    "pick_prior",
    "protocol_for",
    "region",
    "regions",
    "write_protocols",
]

HANGING_PROTOCOL_STORAGE = HangingProtocolStorage
HANGING_PROTOCOL_FIND = HangingProtocolInformationModelFind

# Radiological convention: the patient's right on the viewer's left.
_SIDE_RANK = {"R": 0, None: 1, "L": 2}

# Body parts read together under one protocol. The Lauenstein view is a hip
# projection that is ordered and read with the pelvis.
_MERGED_PARTS = {"HIP": "PELVIS"}
# Body parts with a left and a right. Their classes are split by side in a
# bilateral protocol, and their regions get one; a pelvis AP shows both hips
# on one image and is never split.
_PAIRED = frozenset({"ANKLE", "ELBOW", "FINGER", "FOOT", "HAND", "HIP", "KNEE", "SHOULDER", "WRIST"})
# Dental panoramics come as PX (sometimes DX); everything else as DX or CR.
_MODALITIES = {"JAW": ("PX", "DX")}
_DEFAULT_MODALITIES = ("DX", "CR")

# Attributes the image set selectors point at.
_MODALITY = Tag(0x0008, 0x0060)
_BODY_PART = Tag(0x0018, 0x0015)
_VIEW_POSITION = Tag(0x0018, 0x5101)
_VIEW_CODE_SEQUENCE = Tag(0x0054, 0x0220)
_IMAGE_LATERALITY = Tag(0x0020, 0x0062)

# A 3 MP portrait grayscale display, the common diagnostic monitor; one for
# the current study and one for the prior.
_SCREEN_COLUMNS, _SCREEN_ROWS = 1536, 2048
_MAX_ROWS_COLUMNS = 4  # at most this many viewports across one half before wrapping


# --- view families and regions, from the class table -------------------------


def region(name: str) -> str:
    """The protocol region a class belongs to: its Body Part Examined, merged where read together."""
    part = _class(name).body_part_examined
    return _MERGED_PARTS.get(part, part)


@cache
def _regions() -> tuple[tuple[str, tuple[str, ...]], ...]:
    out: dict[str, list[str]] = {}
    for name in view_classes():
        out.setdefault(region(name), []).append(name)
    return tuple((r, tuple(sorted(names, key=_class_rank))) for r, names in out.items())


def regions() -> dict[str, tuple[str, ...]]:
    """Region name -> its classes in reading order; regions in class-table order."""
    return dict(_regions())


def _class(name: str) -> ViewClass:
    try:
        return view_classes()[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a view class in classes.csv") from None


@cache
def _table_index() -> dict[str, int]:
    return {name: i for i, name in enumerate(view_classes())}


@cache
def _region_index() -> dict[str, int]:
    return {r: i for i, (r, _) in enumerate(_regions())}


def _class_rank(name: str) -> tuple[int, int]:
    return (FAMILIES.index(family(name)), _table_index()[name])


# --- layout of one study ------------------------------------------------------


@dataclass(frozen=True)
class ImageView:
    """One image as the classifier saw it."""

    sop_instance_uid: str
    series_uid: str = ""
    label: str | None = None  # a class name from classes.csv, "unknown" or None (not classified)
    score: float | None = None
    laterality: str | None = None  # "L", "R" or None (unpaired or not stated)
    instance_number: int | None = None
    acquired: str | None = None  # DICOM DT (or DA+TM run together) of acquisition, for ordering
    # What the region detector found on the image: (label, score) pairs. Said
    # of unclassified images only, never used to place one (see _unknown_reason).
    regions: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("sop_instance_uid is required")
        object.__setattr__(self, "regions", tuple((str(lab), float(sc)) for lab, sc in self.regions))
        if self.label is not None and self.label != UNKNOWN:
            _class(self.label)
        if self.laterality not in ("L", "R", None):
            raise ValueError(f"laterality is 'L', 'R' or None, not {self.laterality!r}")
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be within 0..1, not {self.score}")


@dataclass(frozen=True)
class StudyViews:
    """One study's images with their view classes."""

    study_uid: str
    study_date: str  # DICOM DA, YYYYMMDD
    accession: str = ""
    body_parts: frozenset[str] = frozenset()  # Body Part Examined values the study's headers carry
    images: tuple[ImageView, ...] = ()

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("study_uid is required")
        if not re.fullmatch(r"\d{8}", self.study_date or ""):
            raise ValueError(f"study_date must be a DICOM DA (YYYYMMDD), not {self.study_date!r}")
        object.__setattr__(self, "body_parts", frozenset(p.upper() for p in self.body_parts))
        object.__setattr__(self, "images", tuple(self.images))

    @property
    def parts(self) -> frozenset[str]:
        """Body parts from the headers and from the classified images: a missing header does not hide a knee."""
        labelled = {_class(i.label).body_part_examined for i in self.images if i.label not in (None, UNKNOWN)}
        return self.body_parts | labelled


@dataclass(frozen=True)
class DisplaySet:
    """One viewport's worth of images: one class, one side, one study."""

    position: int  # reading order over the whole layout, 0 first
    viewport: tuple[int, int]  # (row, column) in the layout's grid, (0, 0) top left
    study: str  # "current" or "prior"
    study_uid: str
    label: str  # class name, or "unknown"
    family: str  # frontal, lateral, oblique, other, unknown
    laterality: str | None
    images: tuple[str, ...]  # SOP Instance UIDs, stacked in this order
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "viewport": {"row": self.viewport[0], "column": self.viewport[1]},
            "study": self.study,
            "study_uid": self.study_uid,
            "label": self.label,
            "family": self.family,
            "laterality": self.laterality,
            "images": list(self.images),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Layout:
    """Where each display set of a study (and its prior) goes on the screen."""

    protocol: str  # the Hanging Protocol Name this layout follows
    grid: tuple[int, int]  # (rows, columns) over the whole screen area
    display_sets: tuple[DisplaySet, ...]
    current: StudyViews
    prior: StudyViews | None = None

    def to_dict(self) -> dict[str, Any]:
        def study(s: StudyViews | None, half: str) -> dict[str, Any] | None:
            if s is None:
                return None
            return {
                "study_uid": s.study_uid,
                "study_date": s.study_date,
                "accession": s.accession,
                "body_parts": sorted(s.parts),
                "screen": half,
            }

        return {
            "protocol": self.protocol,
            "grid": {"rows": self.grid[0], "columns": self.grid[1]},
            "current": study(self.current, "left" if self.prior else "full"),
            "prior": study(self.prior, "right"),
            "display_sets": [d.to_dict() for d in self.display_sets],
        }


def pick_prior(current: StudyViews, candidates: Iterable[StudyViews]) -> StudyViews | None:
    """The most recent study before ``current`` that shows one of its body parts.

    Later studies are not priors (a report is compared with what was known
    then), and a prior of another body part is no comparison at all.
    """
    parts = current.parts
    earlier = [
        c
        for c in candidates
        if c.study_uid != current.study_uid and c.study_date < current.study_date and c.parts & parts
    ]
    return max(earlier, key=lambda c: c.study_date, default=None)


def layout(study: StudyViews, prior: StudyViews | None = None, *, min_score: float = 0.0) -> Layout:
    """Order a study's images into display sets, with the prior's beside them.

    Images whose score is below ``min_score`` count as unknown: a doubtful
    label is worse than none, because it hides the image in the wrong place.
    """
    cur = _groups(study, min_score)
    pri = _groups(prior, min_score) if prior is not None else []
    cur_slots = list(range(len(cur)))
    pri_slots = _align(cur, pri)
    half = max([len(cur)] + [s + 1 for s in pri_slots])
    rows, cols = _grid(max(half, 1))
    sets: list[DisplaySet] = []
    for which, s, groups, slots, offset in (
        ("current", study, cur, cur_slots, 0),
        ("prior", prior, pri, pri_slots, cols),
    ):
        if s is None:
            continue
        for (key, images, reason), slot in sorted(zip(groups, slots), key=lambda gs: gs[1]):
            label, side = key
            if which == "prior":
                reason += f"; prior of {s.study_date} beside the current, like with like"
            sets.append(
                DisplaySet(
                    position=len(sets),
                    viewport=(slot // cols, offset + slot % cols),
                    study=which,
                    study_uid=s.study_uid,
                    label=label,
                    family=family(label),
                    laterality=side,
                    images=tuple(i.sop_instance_uid for i in images),
                    reason=reason,
                )
            )
    return Layout(
        protocol=_layout_protocol(cur),
        grid=(rows, cols * (2 if prior is not None else 1)),
        display_sets=tuple(sets),
        current=study,
        prior=prior,
    )


_Group = tuple[tuple[str, str | None], list[ImageView], str]


def _groups(study: StudyViews, min_score: float) -> list[_Group]:
    """(class, side) groups in reading order, each with its stacked images and the reason for its place."""
    by_key: dict[tuple[str, str | None], list[ImageView]] = {}
    for image in study.images:
        known = image.label not in (None, UNKNOWN) and (image.score is None or image.score >= min_score)
        key = (image.label, image.laterality) if known else (UNKNOWN, None)
        by_key.setdefault(key, []).append(image)  # type: ignore[arg-type]
    sides: dict[str, set[str | None]] = {}
    for label, side in by_key:
        sides.setdefault(label, set()).add(side)

    def rank(key: tuple[str, str | None]) -> tuple:
        label, side = key
        if label == UNKNOWN:
            return (1,)
        return (0, _region_index()[region(label)], *_class_rank(label), _SIDE_RANK[side])

    out: list[_Group] = []
    for key in sorted(by_key, key=rank):
        label, side = key
        images = sorted(
            by_key[key],
            key=lambda i: (i.instance_number is None, i.instance_number or 0, i.acquired or "", i.sop_instance_uid),
        )
        reason = _unknown_reason(images) if label == UNKNOWN else _reason(label, side, sides[label])
        out.append((key, images, reason))
    return out


def _unknown_reason(images: list[ImageView]) -> str:
    """Why the unclassified set is last, and what the region detector saw in it.

    The detector's findings are told, not used to move an image into a
    region's display set: a spine box is found wherever the spine shows (the
    first shipped detector put one at score >= 0.5 on 12 of 20 chest PA and
    6 of 20 abdomen films), "spine" would have to choose among the whole,
    cervical, thoracic and lumbar spine protocols, and "head" has no protocol
    at all. A wrong place hides an image; a line here tells the reader who
    opens the set what is in it.
    """
    text = "unclassified or low-confidence images, last and apart from the classified views"
    best: dict[str, tuple[int, float]] = {}
    for image in images:
        seen: dict[str, float] = {}
        for label, score in image.regions:
            key = label.strip().lower()
            seen[key] = max(score, seen.get(key, 0.0))
        for key, score in seen.items():
            n, top = best.get(key, (0, 0.0))
            best[key] = (n + 1, max(top, score))
    if best:
        found = ", ".join(
            f"{label} on {n} of {len(images)} (best {top:.2f})" for label, (n, top) in sorted(best.items())
        )
        text += f"; the region detector found {found}"
    return text


def _reason(label: str, side: str | None, sides: set[str | None]) -> str:
    fam = family(label)
    c = _class(label)
    where = {
        "frontal": "frontal view first",
        "lateral": "lateral view after the frontal",
        "oblique": "oblique view after frontal and lateral",
        "other": "special view after the standard projections",
    }[fam]
    text = f"{where} ({label}, {c.body_part_examined})"
    if {"R", "L"} <= sides:
        text += (
            "; both sides present: patient's right on the viewer's left"
            if side == "R"
            else ("; both sides present: patient's left on the viewer's right" if side == "L" else "")
        )
    return text


def _align(cur: list[_Group], pri: list[_Group]) -> list[int]:
    """Slots for the prior's groups: under the same slot as the current's same (class, side)."""
    index = {g[0]: i for i, g in enumerate(cur) if g[0][0] != UNKNOWN}
    next_slot = sum(1 for g in cur if g[0][0] != UNKNOWN)
    slots = []
    for key, _, _ in pri:
        if key in index:
            slots.append(index[key])
        else:
            slots.append(next_slot)
            next_slot += 1
    # An unknown group is always last in its half, whatever was added before it.
    if pri and pri[-1][0][0] == UNKNOWN:
        cur_unknown = len(cur) - 1 if cur and cur[-1][0][0] == UNKNOWN else -1
        slots[-1] = max(slots[-1], cur_unknown)
    return slots


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` viewports: one row up to four, then more rows."""
    rows = math.ceil(n / _MAX_ROWS_COLUMNS)
    return rows, math.ceil(n / rows)


def _layout_protocol(groups: list[_Group]) -> str:
    labels = {key[0] for key, _, _ in groups if key[0] != UNKNOWN}
    found = {region(label) for label in labels}
    if len(found) != 1:
        return "XR MIXED" if found else "XR UNCLASSIFIED"
    (reg,) = found
    bilateral = any({"R", "L"} <= {k[1] for k, _, _ in groups if k[0] == label} for label in labels)
    return _protocol_name(reg, bilateral)


def _protocol_name(reg: str, bilateral: bool) -> str:
    # Hanging Protocol Name is SH: 16 characters at most.
    return f"XR {reg}{' R+L' if bilateral else ''}"


# --- Hanging Protocol Storage instances ---------------------------------------


def _code_item(code: Code) -> Dataset:
    if not (code.value and code.scheme and code.meaning):
        raise ValueError(f"a code needs value, scheme and meaning: {code}")
    return code.item()


@cache
def _cid(cid: str) -> dict[str, str]:
    col = Collection(cid)
    return {c.value: c.meaning for c in (getattr(col, n) for n in col.dir())}


def _anatomy(c: ViewClass) -> Code:
    """The class's anatomy code with the meaning DICOM gives it (the table carries only the value)."""
    meaning = sct_meaning(c.anatomy_code.value)
    if not meaning:
        raise ValueError(f"{c.name}: anatomy code {c.anatomy_code.value} has no meaning in DICOM's SNOMED CT table")
    return Code(c.anatomy_code.value, c.anatomy_code.scheme, meaning)


def _view(c: ViewClass) -> Code | None:
    """The class's view code, with the CID 4010 meaning where the code is in CID 4010."""
    if c.view_code is None:
        return None
    return Code(c.view_code.value, c.view_code.scheme, _cid("CID4010").get(c.view_code.value, c.view_code.meaning))


def _lateral_codes() -> list[Code]:
    views = _cid("CID4010")
    return [Code(v, "SCT", views[v]) for v in ("399067008", "399173006", "399198007")]


@dataclass(frozen=True)
class _Selector:
    """One Image Set Selector: an attribute and the values it may take.

    Values are alternatives (any one matches). ``codes`` selects on a code
    sequence attribute, ``values`` on a CS attribute.
    """

    attribute: int
    values: tuple[str, ...] = ()
    codes: tuple[Code, ...] = ()

    def __post_init__(self) -> None:
        vr = dictionary_VR(self.attribute)
        if vr == "SQ" and (not self.codes or self.values):
            raise ValueError("a sequence attribute is selected by codes")
        if vr == "CS" and (not self.values or self.codes):
            raise ValueError("a CS attribute is selected by values")
        if vr not in ("SQ", "CS"):
            raise ValueError(f"selectors on {vr} attributes are not supported")
        if any(len(v) > 16 or not re.fullmatch(r"[A-Z0-9 _]*", v) for v in self.values):
            raise ValueError(f"not CS values: {self.values}")

    def item(self) -> Dataset:
        ds = Dataset()
        # MATCH: an image without the attribute is not in the set.
        ds.ImageSetSelectorUsageFlag = "MATCH"
        ds.SelectorAttribute = self.attribute
        vr = dictionary_VR(self.attribute)
        ds.SelectorAttributeVR = vr
        # 0: any of the attribute's values may match (Modality and the like are single-valued anyway).
        ds.SelectorValueNumber = 0
        if vr == "SQ":
            ds.SelectorCodeSequenceValue = Sequence([_code_item(c) for c in self.codes])
        else:
            ds.SelectorCSValue = list(self.values) if len(self.values) > 1 else self.values[0]
        return ds


def _view_selector(c: ViewClass) -> _Selector | None:
    """How an image of class ``c`` is told from the region's other views by its header.

    View Position where the table gives one that names the family (AP or PA
    for frontal, LL or RL for lateral, the decubitus position): modalities
    fill it far more often than View Code Sequence, which CR does not even
    require. Frontal takes AP or PA alike (the table merges them, and sites
    differ), lateral either side. Without such a position: the view code,
    any lateral code for a lateral; with neither (the panoramic), nothing,
    as body part and modality say it all.
    """
    fam = family(c.name)
    vp = c.view_position
    if fam == "frontal" and vp in FRONTAL_POSITIONS:
        return _Selector(_VIEW_POSITION, values=tuple(sorted(FRONTAL_POSITIONS)))
    if fam == "lateral" and vp in LATERAL_POSITIONS:
        return _Selector(_VIEW_POSITION, values=("LL", "RL"))
    if vp in DECUBITUS_POSITIONS:
        return _Selector(_VIEW_POSITION, values=(vp,))
    if fam == "lateral":
        return _Selector(_VIEW_CODE_SEQUENCE, codes=tuple(_lateral_codes()))
    view = _view(c)
    if view is not None:
        return _Selector(_VIEW_CODE_SEQUENCE, codes=(view,))
    if vp:
        return _Selector(_VIEW_POSITION, values=(vp,))
    return None


def _modalities(reg: str) -> tuple[str, ...]:
    return _MODALITIES.get(reg, _DEFAULT_MODALITIES)


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:nnrouter:hanging-protocol")


def _uid(*parts: str) -> str:
    """A 2.25 UID from a name-based (version 5) UUID of ``parts``: the same protocol, the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def protocol_for(
    group: str,
    classes: Iterable[str] | None = None,
    *,
    creator: str = "NNROUTER",
    version: str = "1",
    priors: int = 1,
    bilateral: bool = False,
    created: dt.datetime | None = None,
) -> Dataset:
    """A Hanging Protocol Storage instance for one region's radiographs.

    ``group`` is a region from :func:`regions` (a Body Part Examined, with the
    hip merged into PELVIS); ``classes`` the view classes it shows (default:
    all of the region's), placed in reading order whatever order they come
    in. With ``priors`` 1 the current study gets the left screen and the most
    recent prior the right one, like with like. ``bilateral`` splits every
    view of a paired body part into a right and a left display set, the
    right on the viewer's left.
    The SOP Instance UID follows from creator, version and content, so a
    rebuilt protocol replaces its earlier copy in a viewer rather than
    piling up beside it.
    """
    group = _MERGED_PARTS.get(group.upper(), group.upper())
    known = regions()
    if group not in known:
        raise ValueError(f"unknown region {group!r}; regions are {', '.join(known)}")
    names = list(classes) if classes is not None else list(known[group])
    if not names:
        raise ValueError("a protocol shows at least one view class")
    for n in names:
        if region(n) != group:
            raise ValueError(f"{n} belongs to region {region(n)}, not {group}")
    names = sorted(dict.fromkeys(names), key=_class_rank)
    if priors not in (0, 1):
        raise ValueError("priors is 0 or 1")
    if not creator or len(creator) > 64:
        raise ValueError("creator must be 1..64 characters (LO)")
    vcs = [_class(n) for n in names]
    if bilateral and not any(_paired(c) for c in vcs):
        raise ValueError(f"none of {', '.join(names)} has a left and a right side")
    name = _protocol_name(group, bilateral)
    created = created or dt.datetime.now(dt.UTC)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = HANGING_PROTOCOL_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    # SOP Common
    ds.SOPClassUID = HANGING_PROTOCOL_STORAGE
    ds.SOPInstanceUID = _uid(creator, version, name, *names, str(priors))
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")
    # Hanging Protocol Definition (C.23.1)
    ds.HangingProtocolName = name
    views = ", ".join(n for n in names)
    ds.HangingProtocolDescription = _lo(
        f"{group} radiographs{' both sides' if bilateral else ''}: {views}"
        f"{'; prior on the right screen' if priors else ''} (version {version})"
    )
    ds.HangingProtocolLevel = "SITE"
    ds.HangingProtocolCreator = creator
    ds.HangingProtocolCreationDateTime = created.strftime("%Y%m%d%H%M%S")
    ds.HangingProtocolDefinitionSequence = Sequence(_definitions(group, vcs))
    ds.NumberOfPriorsReferenced = priors
    cells = _cells(vcs, bilateral)
    image_sets, numbers = _image_sets(cells, priors)
    ds.ImageSetsSequence = Sequence(image_sets)
    ds.HangingProtocolUserIdentificationCodeSequence = Sequence()
    # Hanging Protocol Environment (C.23.2)
    screens = 2 if priors else 1
    ds.NumberOfScreens = screens
    ds.NominalScreenDefinitionSequence = Sequence([_screen(i, screens) for i in range(screens)])
    # Hanging Protocol Display (C.23.3)
    ds.DisplaySetsSequence = Sequence(_display_sets(cells, numbers, priors))
    ds.PartialDataDisplayHandling = "ADAPT_LAYOUT"
    return ds


def _lo(text: str) -> str:
    return text if len(text) <= 64 else text[:61] + "..."


def _definitions(group: str, vcs: list[ViewClass]) -> list[Dataset]:
    """One definition item per anatomy the region's classes show.

    Items are alternatives: a study matching any one is a candidate. Each
    names its anatomy (with Laterality empty: either side) and no Modality.
    dciodvfy reads Modality and Anatomic Region Sequence in one item as
    mutually exclusive, and a Modality-only item would make every region's
    protocol a candidate for every DX study; the modalities live in the
    image set selectors instead, where they restrict the images shown.
    """
    anatomies = list(dict.fromkeys(_anatomy(c) for c in vcs))
    items = []
    for code in anatomies:
        item = Dataset()
        item.AnatomicRegionSequence = Sequence([_code_item(code)])
        item.Laterality = ""  # any side
        item.ProcedureCodeSequence = Sequence()
        item.ReasonForRequestedProcedureCodeSequence = Sequence()
        items.append(item)
    return items


_Cell = tuple[ViewClass, "str | None"]


def _paired(c: ViewClass) -> bool:
    return c.body_part_examined in _PAIRED


def _cells(vcs: list[ViewClass], bilateral: bool) -> list[_Cell]:
    """The (class, side) pairs a protocol shows, in reading order: the right side on the viewer's left."""
    return [(c, side) for c in vcs for side in (("R", "L") if bilateral and _paired(c) else (None,))]


def _image_sets(cells: list[_Cell], priors: int) -> tuple[list[Dataset], dict[tuple[str, str | None, int], int]]:
    """One image set per (class, side): its selectors, and a current (and prior) time slot each.

    Images are told apart by the image set selectors (Modality, Body Part
    Examined, the view, Image Laterality) rather than by display set filter
    operations: every viewer that implements hanging protocols applies
    selectors, and dciodvfy accepts no Filter Operations item that selects
    by attribute. Returns the items and the Image Set Number of each
    (class, side, time), time 0 being the current study and 1 the prior.
    """
    items: list[Dataset] = []
    numbers: dict[tuple[str, str | None, int], int] = {}
    for c, side in cells:
        selectors = [
            _Selector(_MODALITY, values=_modalities(region(c.name))),
            _Selector(_BODY_PART, values=(c.body_part_examined,)),
        ]
        view = _view_selector(c)
        if view is not None:
            selectors.append(view)
        if side is not None:
            selectors.append(_Selector(_IMAGE_LATERALITY, values=(side,)))
        item = Dataset()
        item.ImageSetSelectorSequence = Sequence([s.item() for s in selectors])
        label = f"{c.name}{' ' + side if side else ''}"
        times = []
        for t in range(priors + 1):
            number = len(numbers) + 1
            numbers[(c.name, side, t)] = number
            tb = Dataset()
            tb.ImageSetNumber = number
            if t == 0:
                tb.ImageSetSelectorCategory = "RELATIVE_TIME"
                tb.RelativeTime = [0, 0]
                tb.RelativeTimeUnits = "DAYS"
                tb.ImageSetLabel = _lo(f"current {label}")
            else:
                tb.ImageSetSelectorCategory = "ABSTRACT_PRIOR"
                tb.AbstractPriorValue = [t, t]
                tb.ImageSetLabel = _lo(f"prior {label}")
            times.append(tb)
        item.TimeBasedImageSetsSequence = Sequence(times)
        items.append(item)
    return items, numbers


def _screen(i: int, screens: int) -> Dataset:
    s = Dataset()
    s.NumberOfVerticalPixels = _SCREEN_ROWS
    s.NumberOfHorizontalPixels = _SCREEN_COLUMNS
    # Normalised display environment: (0,0) lower left, (1,1) upper right; screens left to right.
    s.DisplayEnvironmentSpatialPosition = [i / screens, 1.0, (i + 1) / screens, 0.0]
    s.ScreenMinimumGrayscaleBitDepth = 8
    return s


def _display_sets(cells: list[_Cell], numbers: dict[tuple[str, str | None, int], int], priors: int) -> list[Dataset]:
    """One display set per (time, class, side): the current on the left screen, the prior on the right, like with like."""
    rows, cols = _grid(len(cells))
    halves = priors + 1
    out: list[Dataset] = []
    for t in range(halves):
        for slot, (c, side) in enumerate(cells):
            r, col = divmod(slot, cols)
            ds = Dataset()
            ds.DisplaySetNumber = len(out) + 1
            ds.DisplaySetLabel = _lo(f"{'current' if t == 0 else 'prior'} {c.name}{' ' + side if side else ''}")
            ds.DisplaySetPresentationGroup = 1
            ds.DisplaySetPresentationGroupDescription = "current and prior side by side" if priors else "current"
            ds.ImageSetNumber = numbers[(c.name, side, t)]
            box = Dataset()
            box.ImageBoxNumber = 1
            # Upper left x, y then lower right x, y; y grows upwards.
            box.DisplayEnvironmentSpatialPosition = [
                (t + col / cols) / halves,
                1.0 - r / rows,
                (t + (col + 1) / cols) / halves,
                1.0 - (r + 1) / rows,
            ]
            box.ImageBoxLayoutType = "STACK"
            ds.ImageBoxesSequence = Sequence([box])
            ds.FilterOperationsSequence = Sequence()  # the image set is already one view of one side
            sort = Dataset()
            sort.SortByCategory = "BY_ACQ_TIME"
            sort.SortingDirection = "INCREASING"
            ds.SortingOperationsSequence = Sequence([sort])
            ds.VOIType = ""  # the image's own window
            ds.ShowGrayscaleInverted = "NO"
            ds.ShowImageTrueSizeFlag = "NO"
            ds.ShowGraphicAnnotationFlag = "YES"
            out.append(ds)
    return out


def generic_protocols(
    creator: str = "NNROUTER", version: str = "1", *, created: dt.datetime | None = None
) -> list[Dataset]:
    """The generic set: one protocol per region with its prior, plus a both-sides one for paired regions."""
    created = created or dt.datetime.now(dt.UTC)
    out = []
    for reg in regions():
        out.append(protocol_for(reg, creator=creator, version=version, created=created))
        if any(_paired(_class(n)) for n in regions()[reg]):
            out.append(protocol_for(reg, creator=creator, version=version, bilateral=True, created=created))
    return out


def write_protocols(folder: Path | str, protocols: Iterable[Dataset] | None = None, **kwargs: Any) -> list[Path]:
    """Write protocols (default: the generic set) as Part 10 files named after them.

    Two protocols of one name (say with and without a prior) get the end of
    their SOP Instance UID in the file name rather than overwriting each other.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for ds in protocols if protocols is not None else generic_protocols(**kwargs):
        stem = re.sub(r"[^A-Za-z0-9]+", "_", str(ds.HangingProtocolName)).strip("_").lower()
        path = folder / f"{stem}.dcm"
        if path in out:
            path = folder / f"{stem}_{str(ds.SOPInstanceUID)[-8:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out
