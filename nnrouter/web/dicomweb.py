"""QIDO-RS under /dicom-web/: the C-FIND SCP's search, over HTTP, in the DICOM JSON model (PS3.18 10.6, F.2).

The search is the C-FIND SCP's own (``nnrouter.dicom.query``): the query
parameters become a Study Root identifier, matched by the same code, so
wildcards, ranges, lists and nnrouter's findings (Body Part Examined, View
Position and View Code Sequence from the classifier) match here exactly as
they do over DICOM. ``includefield`` adds return keys (``all``: every key
the level supports), ``limit`` and ``offset`` page the answers.
``fuzzymatching`` is accepted and changes nothing: person names already
match case-insensitively, and nothing looser is done. Patient names and IDs
are in the answers, so a login (session or token) is needed, as for the
console's patient fields.

WADO-RS, STOW-RS, rendered resources and the read-only DICOMweb role are
not built yet.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from nnrouter.dicom.query import STUDY_ROOT_FIND, BadIdentifier, Query, keys_for, parse_request
from nnrouter.web.auth import Principal
from nnrouter.web.deps import console, member

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])
Member = Depends(member)

MEDIA_TYPE = "application/dicom+json"
CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}

# The attributes each level returns without being asked (PS3.18 Table 6.7.1-2, those the store keeps).
DEFAULTS = {
    "STUDY": [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "ViewPosition", "BodyPartExamined"],
}


def _keyword(name: str) -> str:
    """A query parameter's attribute: a keyword, or a tag as 8 hex digits (``00100020``)."""
    if tag_for_keyword(name) is not None:
        return name
    if len(name) == 8:
        try:
            kw = keyword_for_tag(int(name, 16))
        except ValueError:
            kw = ""
        if kw:
            return kw
    raise HTTPException(400, f"{name!r} is neither a DICOM keyword nor a tag")


def identifier(level: str, params: list[tuple[str, str]], fixed: dict[str, str]) -> tuple[Dataset, int, int]:
    """The C-FIND identifier for a QIDO search, and its limit and offset."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    wanted = list(DEFAULTS["STUDY"])
    if level in ("SERIES", "IMAGE"):
        wanted += DEFAULTS["SERIES"]
    if level == "IMAGE":
        wanted += DEFAULTS["IMAGE"]
    values: dict[str, str] = dict(fixed)
    limit, offset = 100, 0
    for name, value in params:
        if name == "includefield":
            for field in value.split(","):
                field = field.strip()
                if field == "all":
                    wanted += [k for k, kind in keys_for(level).items() if kind != "seq"]
                elif field:
                    wanted.append(_keyword(field))
        elif name in ("limit", "offset"):
            try:
                n = int(value)
            except ValueError:
                raise HTTPException(400, f"{name} must be a whole number, not {value!r}") from None
            if n < 0:
                raise HTTPException(400, f"{name} must not be negative")
            limit, offset = (n, offset) if name == "limit" else (limit, n)
        elif name == "fuzzymatching":
            continue
        else:
            values[_keyword(name)] = value
    for kw in dict.fromkeys(wanted + list(values)):
        if kw not in keys_for(level):
            if kw in values:
                raise HTTPException(400, f"{kw} cannot be matched at the {level.lower()} level")
            continue
        vr = dictionary_VR(kw)
        value = values.get(kw, "")
        if vr == "SQ":
            setattr(ds, kw, [])
        elif vr in ("US", "UL", "SS", "SL") and value == "":
            ds.add_new(kw, vr, None)
        else:
            setattr(ds, kw, value)
    return ds, limit, offset


def _search(request: Request, level: str, fixed: dict[str, str]) -> JSONResponse:
    params = [(k, v) for k, v in request.query_params.multi_items()]
    ds, limit, offset = identifier(level, params, fixed)
    try:
        parsed = parse_request(ds, STUDY_ROOT_FIND)
    except BadIdentifier as exc:
        raise HTTPException(400, str(exc)) from exc
    query = Query(console(request).store, max_results=offset + limit)
    answers, truncated = query.find(parsed)
    out: list[dict[str, Any]] = []
    for answer in answers[offset : offset + limit]:
        if "QueryRetrieveLevel" in answer:
            del answer.QueryRetrieveLevel
        out.append(answer.to_json_dict())
    headers = {"Warning": '299 nnrouter "there are more matches: ask with a larger offset"'} if truncated else {}
    return JSONResponse(out, media_type=MEDIA_TYPE, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def studies(request: Request, p: Principal = Member) -> JSONResponse:
    return _search(request, "STUDY", {})


@router.get("/series", summary="QIDO-RS: search for series")
def series(request: Request, p: Principal = Member) -> JSONResponse:
    return _search(request, "SERIES", {})


@router.get("/studies/{study}/series", summary="QIDO-RS: the series of a study")
def study_series(request: Request, study: str, p: Principal = Member) -> JSONResponse:
    return _search(request, "SERIES", {"StudyInstanceUID": study})


@router.get("/instances", summary="QIDO-RS: search for instances")
def instances(request: Request, p: Principal = Member) -> JSONResponse:
    return _search(request, "IMAGE", {})


@router.get("/studies/{study}/instances", summary="QIDO-RS: the instances of a study")
def study_instances(request: Request, study: str, p: Principal = Member) -> JSONResponse:
    return _search(request, "IMAGE", {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series_uid}/instances", summary="QIDO-RS: the instances of a series")
def series_instances(request: Request, study: str, series_uid: str, p: Principal = Member) -> JSONResponse:
    return _search(request, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series_uid})
