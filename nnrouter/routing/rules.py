"""Routing rules: where each study goes, read from a YAML file an admin edits.

The file is the contract between the radiology admins and the router, so it is
validated strictly (unknown keys, unknown destinations, bad regexes, unknown
DICOM keywords and class names are all errors) and every error is located at
file:line:column with the field path: a rule file that half-loads would route
studies somewhere nobody intended. A file that fails never replaces the
running rules (the route stage's job); this module only says what is wrong.

Deciding is a pure function of the rules and the facts about one study
(`decide`), so `nnrouter rules test` can show exactly what the router would
do, and why, without sending anything. The `why` of each rule never quotes
header values: decisions are stored and shown, and headers hold patient data.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pydicom
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from nnrouter.core import codes, yamlfile
from nnrouter.core.config import Dicom, valid_ae_title
from nnrouter.orders.order import FlagKind

__all__ = [
    "Coerce",
    "Condition",
    "Decision",
    "Delivery",
    "Destination",
    "DetectorRegions",
    "InstanceFacts",
    "RetryPolicy",
    "RouteSettings",
    "Rule",
    "RuleOutcome",
    "RuleSet",
    "StudyFacts",
    "Then",
    "TimeWindow",
    "Tls",
    "coerce",
    "decide",
    "detector_regions",
    "digest",
    "json_schema",
    "load_rules",
]

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# Values a header dict cannot carry (the owner reads plain values only), so a
# tag condition on them could never be true and is refused at load time.
UNTESTABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
# Binary numbers: pydicom wants python numbers for these (IS and DS take text).
_INT_VRS = {"US", "SS", "UL", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}
_SKIP_CONTEXT = "located_cross_checks"
# Validation context: our AE title (the config's dicom.ae_title), for destinations that do not name one.
_CALLING_AE_CONTEXT = "calling_ae"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- small validated types -------------------------------------------------


def _listify(value: Any) -> Any:
    """`forward: pacs` and `forward: [pacs]` both read as a list: admins write either."""
    return [value] if isinstance(value, str) else value


_STR_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
StrList = Annotated[list[str], Field(min_length=1), BeforeValidator(_listify), WithJsonSchema(_STR_OR_LIST)]
Names = Annotated[list[str], BeforeValidator(_listify), WithJsonSchema(_STR_OR_LIST)]


def _scalar(value: Any) -> str | int | float:
    # YAML 1.1 reads yes/no/on/off as booleans: `equals: NO` (Norway) would compare against False.
    if isinstance(value, bool):
        raise ValueError("YAML read this as true/false; put the value in quotes")
    if not isinstance(value, (str, int, float)):
        raise ValueError("expected a string or a number")
    return value


Scalar = Annotated[Any, PlainValidator(_scalar), WithJsonSchema({"type": ["string", "number"]})]


def _hhmm(value: Any) -> Any:
    # YAML 1.1 reads an unquoted 22:00 as the base-60 number 1320: turn it back.
    if isinstance(value, int) and not isinstance(value, bool):
        if 60 <= value <= 24 * 60:
            return f"{value // 60:02d}:{value % 60:02d}"
        raise ValueError('write the time as "HH:MM", in quotes')
    return value


_HHMM = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"
HHMM = Annotated[
    str, BeforeValidator(_hhmm), Field(pattern=_HHMM, description='"HH:MM", 24-hour clock; "24:00" ends a day')
]


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def _lower_days(value: Any) -> Any:
    return [d.lower() if isinstance(d, str) else d for d in value] if isinstance(value, list) else value


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _keyword(value: str) -> str:
    value = value.strip()
    if tag_for_keyword(value) is None:
        raise ValueError(f"unknown DICOM keyword {value!r}{_suggest(value, keyword_dict)}")
    return value


def _plain_keyword(value: str, use: str) -> str:
    """A keyword of a text or number attribute: what rules can test and `set` can write."""
    value = _keyword(value)
    tag = tag_for_keyword(value)
    assert tag is not None  # _keyword refuses unknown keywords
    vr = dictionary_VR(tag)
    if set(vr.split(" or ")) & UNTESTABLE_VRS:
        raise ValueError(f"{value} is a {vr} attribute; {use} text and number attributes only")
    return value


def _testable_keyword(value: str) -> str:
    return _plain_keyword(value, "rules can test")


def _class_names(value: list[str]) -> list[str]:
    known = [*codes.classes(), "other"]
    for name in value:
        if name not in known:
            hint = " (use the `unknown` condition for that)" if name == "unknown" else _suggest(name, known)
            raise ValueError(f"unknown class {name!r}{hint}; see nnrouter/data/classes.csv")
    return value


def _plural(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


# --- destinations ----------------------------------------------------------


class RetryPolicy(_Model):
    """Exponential back-off, capped, so a peer that is down is not hammered and is not given up on too soon."""

    max_retries: int = Field(10, ge=0)
    first_delay_s: float = Field(10, ge=0)
    multiplier: float = Field(2, ge=1)
    max_delay_s: float = Field(600, ge=0)

    def delay(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1-based)."""
        try:
            raw = self.first_delay_s * self.multiplier ** (max(attempt, 1) - 1)
        except OverflowError:
            return self.max_delay_s
        return min(raw, self.max_delay_s) if math.isfinite(raw) else self.max_delay_s


class TimeWindow(_Model):
    """Hours of the week, in the router's local time: admins think "off-peak" on the wall clock.

    A window whose end is before its start wraps midnight and belongs to the
    day it starts on: fri 22:00-06:00 holds Friday night into Saturday morning.
    """

    days: Annotated[list[Day], BeforeValidator(_lower_days), Field(min_length=1)] = list(DAYS)
    start: HHMM = "00:00"
    end: HHMM = "24:00"

    @model_validator(mode="after")
    def _sane(self) -> TimeWindow:
        if self.start == "24:00":
            raise ValueError('start "24:00" is not a time of day; use "00:00"')
        if self.start == self.end:
            raise ValueError('start and end are equal; for the whole day use "00:00" to "24:00"')
        return self

    def contains(self, when: datetime) -> bool:
        """Aware datetimes are converted to local time; naive ones are taken as local already."""
        local = when.astimezone() if when.tzinfo is not None else when
        now = local.hour * 60 + local.minute + local.second / 60
        start, end = _minutes(self.start), _minutes(self.end)
        today = DAYS[local.weekday()] in self.days
        if start < end:
            return today and start <= now < end
        yesterday = DAYS[(local - timedelta(days=1)).weekday()] in self.days
        return (today and now >= start) or (yesterday and now < end)

    def _describe(self) -> str:
        days = "every day" if set(self.days) == set(DAYS) else ",".join(self.days)
        return f"{days} {self.start}-{self.end}"


class Tls(_Model):
    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> Tls:
        # Without a CA we cannot tell the PACS from whoever answers on its port.
        if self.enabled and self.ca is None:
            raise ValueError("TLS needs `ca` (the certificate authority that signed the peer's certificate)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give `cert` and `key` together (our client certificate and its private key)")
        return self


def _uid(value: str) -> str:
    value = value.strip()
    if len(value) > 64 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", value):
        raise ValueError(f"{value!r} is not a UID (digits and dots, e.g. 1.2.840.10008.1.2.1)")
    return value


class Destination(_Model):
    """A DICOM peer we send to."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="used in rules' `forward`")
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    # validate_default: an omitted calling_ae is filled in (_our_title) before it is checked.
    calling_ae: str = Field(
        None,
        validate_default=True,
        description="who we say we are to this peer; default: our own AE title, dicom.ae_title of the configuration",
    )
    tls: Tls = Tls()
    max_associations: int = Field(1, ge=1)
    timeout_s: float = Field(
        30,
        gt=0,
        description="seconds to wait for the association and for each answer; "
        "past it the attempt failed and is retried",
    )
    transfer_syntaxes: list[str] = Field([], description="preferred order; empty: what the instance has")
    retry: RetryPolicy = RetryPolicy()
    windows: list[TimeWindow] = Field([], description="when sending is allowed; empty: always")

    _check_ae = field_validator("ae_title", "calling_ae")(valid_ae_title)

    @field_validator("calling_ae", mode="before")
    @classmethod
    def _our_title(cls, value: Any, info: ValidationInfo) -> Any:
        """Omitted: the title the configuration gives us, so a site that renames nnrouter renames it once."""
        if value is not None:
            return value
        return (info.context or {}).get(_CALLING_AE_CONTEXT) or Dicom.model_fields["ae_title"].default

    @field_validator("transfer_syntaxes")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        return [_uid(v) for v in value]

    def open_at(self, when: datetime) -> bool:
        return not self.windows or any(w.contains(when) for w in self.windows)


# --- conditions ------------------------------------------------------------


class TagCondition(_Model):
    """One test on a header attribute, over the study's instances."""

    keyword: str
    equals: Scalar | None = None
    in_: Annotated[list[Scalar], Field(min_length=1)] | None = Field(None, alias="in")
    regex: str | None = Field(None, description="searched anywhere in the value; anchor with ^ and $")
    exists: bool | None = Field(None, description="present and not empty")
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    of: Literal["any", "all"] = "any"

    _check_keyword = field_validator("keyword")(_testable_keyword)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_test(self) -> TagCondition:
        given = {k for k in self.model_fields_set if getattr(self, k) is not None}
        tests = [k for k in ("equals", "in_", "regex", "exists") if k in given]
        numeric = [k for k in ("lt", "le", "gt", "ge") if k in given]
        if len(tests) + bool(numeric) != 1:
            raise ValueError(
                "give one test: equals, in, regex, exists, or lt/le/gt/ge (these may combine into a range)"
            )
        return self


class Predicted(_Model):
    class_: StrList = Field(alias="class")
    of: Literal["any", "all", "none"] = "any"
    min_score: float = Field(0.0, ge=0, le=1)

    _check_class = field_validator("class_")(_class_names)


class Unknown(_Model):
    of: Literal["any", "all"] = "any"


class Region(_Model):
    label: str = Field(min_length=1, description="a label of the configured detector, any case (HEAD, SPINE, ...)")
    min_score: float = Field(0.0, ge=0, le=1)
    present: bool = True


@dataclass(frozen=True)
class DetectorRegions:
    """What the configured detector can find, for checking region conditions when rules load.

    A region it has no label for, or lists as not covered (never trained on),
    is never found: ``present: true`` on it can never match and
    ``present: false`` always does, so "no chest box" would read as "no chest".
    ``model`` None: no detector is configured, and no region is ever found.
    Labels are spelt as the card spells them; conditions compare them in any case.
    """

    model: str | None
    labels: tuple[str, ...] = ()
    not_covered: tuple[str, ...] = ()

    def has(self, label: str) -> bool:
        return label.strip().casefold() in {s.strip().casefold() for s in self.labels}

    def covers(self, label: str) -> bool:
        return label.strip().casefold() not in {s.strip().casefold() for s in self.not_covered}


def detector_regions(model_dir: Path | None) -> DetectorRegions:
    """The labels of the detector in ``model_dir`` (its card); raises ModelCardError if the card is unusable."""
    from nnrouter.pixels.modelcard import load_card

    if model_dir is None:
        return DetectorRegions(None)
    card = load_card(model_dir)
    return DetectorRegions(f"{card.name} {card.version}", tuple(card.labels), tuple(card.not_covered))


def _conditions(cond: Any, loc: tuple) -> list[tuple[tuple, Any]]:
    """Every (location, raw condition) under ``cond``, through all/any/not, as written in the file."""
    if not isinstance(cond, dict):
        return []
    out = [(loc, cond)]
    for key in ("all", "any"):
        if isinstance(cond.get(key), list):
            for j, sub in enumerate(cond[key]):
                out += _conditions(sub, (*loc, key, j))
    if "not" in cond:
        out += _conditions(cond["not"], (*loc, "not"))
    return out


def _region_problems(data: Any, detector: DetectorRegions) -> list[tuple[tuple, str]]:
    """Region conditions the detector can never answer: each is located at its label."""
    out: list[tuple[tuple, str]] = []
    found = data.get("rules") if isinstance(data, dict) else None
    for i, r in enumerate(found if isinstance(found, list) else []):
        when = r.get("when") if isinstance(r, dict) else None
        for loc, cond in _conditions(when, ("rules", i, "when")):
            region = cond.get("region")
            label = region.get("label") if isinstance(region, dict) else None
            if not isinstance(label, str) or not label.strip():
                continue  # the model validation says what is wrong with it
            want = label.strip().casefold()
            never = "can never match" if region.get("present", True) is not False else "always matches"
            if detector.model is None:
                why = (
                    f"region {label!r}: no detector is configured (models.detector is null), "
                    f"so no region is ever found and this condition {never}"
                )
            elif not detector.covers(label):
                why = (
                    f"region {label!r}: detector {detector.model} does not cover {want} (its card lists it as "
                    f"not_covered: it was never trained on it), so a missing {want} box says nothing and this "
                    f"condition {never}; use a tag or predicted condition for {want}"
                )
            elif not detector.has(label):
                labels = ", ".join(detector.labels) or "none"
                folded = {s.strip().casefold(): s for s in detector.labels}
                close = difflib.get_close_matches(want, list(folded), n=1)
                hint = f" (did you mean {folded[close[0]]}?)" if close else ""
                why = (
                    f"region {label!r} is not a label of detector {detector.model}{hint}; "
                    f"its labels: {labels}; this condition {never}"
                )
            else:
                continue
            out.append(((*loc, "region", "label"), why))
    return out


def _mismatch(value: Any) -> list[str] | Literal["any"]:
    if value == "any":
        return "any"
    value = _listify(value)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError('expected "any" or a list of mismatch flags')
    unknown = [v for v in value if v not in FlagKind.ALL]
    if unknown:
        raise ValueError(f"unknown flag {', '.join(map(repr, unknown))}; the flags are {', '.join(FlagKind.ALL)}")
    return value


Mismatch = Annotated[
    Any,
    PlainValidator(_mismatch),
    WithJsonSchema(
        {"anyOf": [{"const": "any"}, {"type": "array", "items": {"enum": list(FlagKind.ALL)}, "minItems": 1}]}
    ),
]


class Condition(_Model):
    """Exactly one test per object; `all`, `any` and `not` combine them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1, "maxProperties": 1})

    all_: Annotated[list[Condition], Field(min_length=1)] | None = Field(None, alias="all")
    any_: Annotated[list[Condition], Field(min_length=1)] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")
    tag: TagCondition | None = None
    calling_ae: StrList | None = None
    called_ae: StrList | None = None
    modality: StrList | None = None
    predicted: Predicted | None = None
    unknown: Unknown | None = None
    region: Region | None = None
    mismatch: Mismatch | None = None
    time: TimeWindow | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        given = sorted(k for k in self.model_fields_set if getattr(self, k) is not None)
        if len(given) != 1:
            names = ", ".join(type(self).model_fields[g].alias or g for g in given) or "none"
            raise ValueError(f"give exactly one condition per item (found: {names}); combine several with all/any")
        return self


# --- rules -----------------------------------------------------------------


def _set_value(keyword: str, value: str) -> Any:
    """The python value pydicom should store: numbers for binary numeric VRs, lists for backslashes."""
    tag = tag_for_keyword(keyword)
    assert tag is not None  # keywords reach here validated (_settable_keyword)
    vr = dictionary_VR(tag).split(" or ")[0]
    parts = value.split("\\")
    try:
        if vr in _INT_VRS:
            nums: list[Any] = [int(p) for p in parts]
        elif vr in _FLOAT_VRS:
            nums = [float(p) for p in parts]
        else:
            return value
    except ValueError:
        raise ValueError(f"{keyword} holds numbers ({vr}); {value!r} is not one") from None
    return nums[0] if len(nums) == 1 else nums


def _settable_keyword(value: str) -> str:
    return _plain_keyword(value, "`set` takes")


def _to_str(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Coerce(_Model):
    """Changes made to the forwarded copy only; what we received is kept as received."""

    fill_from_prediction: bool = Field(False, description="fill EMPTY BodyPartExamined, ViewPosition, ViewCodeSequence")
    set: dict[Annotated[str, AfterValidator(_settable_keyword)], Annotated[str, BeforeValidator(_to_str)]] = {}

    @field_validator("set")
    @classmethod
    def _values(cls, value: dict[str, str]) -> dict[str, str]:
        for keyword, v in value.items():
            _set_value(keyword, v)
        return value


class Then(_Model):
    forward: Names = Field([], description="destination names")
    coerce: Coerce | None = None
    hold: bool = Field(False, description="queue the deliveries held until someone releases them")
    report: bool = Field(False, description="also send nnrouter's findings as a Comprehensive SR in the study")
    discard: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> Then:
        if self.discard and (self.forward or self.hold):
            raise ValueError("discard cannot go with forward or hold")
        if not (self.forward or self.hold or self.discard):
            raise ValueError("then does nothing: give forward, hold or discard")
        if self.coerce is not None and not self.forward:
            raise ValueError("coerce changes forwarded copies: give forward too")
        if self.report and not self.forward:
            raise ValueError("report goes with forwarded studies: give forward too")
        return self


class Rule(_Model):
    name: str = Field(min_length=1)
    priority: int = Field(100, description="lower runs first; equal priorities run in file order")
    # Declared before `when` so that `when`'s validator can see it.
    fallback: bool = Field(False, description="runs only when no other rule matched; at most one")
    when: Condition | None = Field(None, description="none: every study")
    then: Then
    continue_: bool = Field(False, alias="continue", description="after a match: also evaluate later rules")

    @field_validator("when")
    @classmethod
    def _fallback_has_no_when(cls, value: Condition | None, info: ValidationInfo) -> Condition | None:
        if value is not None and info.data.get("fallback"):
            raise ValueError("a fallback rule catches whatever nothing else matched: it has no `when`")
        return value


class RouteSettings(_Model):
    quiet_s: float = Field(30, ge=0, description="a study is routed after this long with nothing new")
    quiet_s_by_calling_ae: dict[str, Annotated[float, Field(ge=0)]] = {}


Loc = tuple[Any, ...]


def _cross_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Checks across fields, on raw data, so they run (and are located) even when other fields are wrong."""
    out: list[tuple[Loc, str]] = []
    dests, rules = data.get("destinations"), data.get("rules")
    names: dict[str, int] = {}
    for i, d in enumerate(dests if isinstance(dests, list) else []):
        name = d.get("name") if isinstance(d, dict) else None
        if isinstance(name, str):
            if name in names:
                out.append(
                    (
                        ("destinations", i, "name"),
                        f"duplicate destination name {name!r} (also destinations[{names[name]}])",
                    )
                )
            else:
                names[name] = i
    rule_names: dict[str, int] = {}
    fallback: str | None = None
    for i, r in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(r, dict):
            continue
        name = r.get("name")
        if isinstance(name, str):
            if name in rule_names:
                out.append((("rules", i, "name"), f"duplicate rule name {name!r} (also rules[{rule_names[name]}])"))
            else:
                rule_names[name] = i
        if r.get("fallback") is True:
            if fallback is not None:
                out.append((("rules", i, "fallback"), f"a second fallback rule; {fallback!r} is the fallback already"))
            else:
                fallback = name if isinstance(name, str) else f"rules[{i}]"
        then = r.get("then")
        forward = then.get("forward") if isinstance(then, dict) else None
        if isinstance(dests, list) and forward is not None:
            listed = isinstance(forward, list)
            for j, dest in enumerate(forward if listed else [forward]):
                if isinstance(dest, str) and dest not in names:
                    loc = ("rules", i, "then", "forward") + ((j,) if listed else ())
                    known = ", ".join(names) or "none defined"
                    out.append((loc, f"unknown destination {dest!r}{_suggest(dest, names)}; destinations: {known}"))
    return out


class RuleSet(_Model):
    """A whole rule file."""

    settings: RouteSettings = RouteSettings()
    destinations: list[Destination]
    rules: list[Rule]

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> RuleSet:
        if info.context and info.context.get(_SKIP_CONTEXT):
            return self  # load_rules ran them on the raw data, located
        raw = {
            "destinations": [{"name": d.name} for d in self.destinations],
            "rules": [
                {"name": r.name, "fallback": r.fallback, "then": {"forward": r.then.forward}} for r in self.rules
            ],
        }
        problems = _cross_problems(raw)
        if problems:
            raise ValueError("; ".join(f"{yamlfile.field_path(loc)}: {why}" for loc, why in problems))
        return self

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


def load_rules(
    path: Path, text: str | None = None, *, detector: DetectorRegions | None = None, calling_ae: str | None = None
) -> RuleSet:
    """Read and validate a rule file; raises yamlfile.FileProblems listing every problem, by line.

    With ``detector`` (what the configured detector can find), a region
    condition it can never answer is a problem too; without, regions are not checked.
    ``calling_ae`` (the configuration's dicom.ae_title) is the calling AE title of
    destinations that do not give one; None: dicom.ae_title's default.
    ``text``: the file's content, already read (a version kept in the store).
    """
    path = Path(path)
    name = str(path)
    data, positions = yamlfile.load_mapping(path, text)
    found = _cross_problems(data) + (_region_problems(data, detector) if detector is not None else [])
    problems = [yamlfile.problem_at(name, positions, loc, why) for loc, why in found]
    ruleset = None
    try:
        ruleset = RuleSet.model_validate(data, context={_SKIP_CONTEXT: True, _CALLING_AE_CONTEXT: calling_ae})
    except ValidationError as exc:
        # pydantic names a bad dict key `.[key]`; the key itself is the field people look for.
        problems += [
            replace(p, field=p.field.removesuffix(".[key]")) for p in yamlfile.problems_from(exc, name, positions)
        ]
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise yamlfile.FileProblems(problems)
    assert ruleset is not None
    return ruleset


def json_schema() -> dict[str, Any]:
    """For editors (YAML language server): completion and red squiggles while typing."""
    schema = RuleSet.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "nnrouter rules", **schema}


digest = yamlfile.digest  # which version of the rule file decided: stored with each decision


# --- deciding --------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    sop_instance_uid: str
    header: dict[str, Any]
    modality: str | None
    label: str | None
    score: float | None
    regions: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class StudyFacts:
    study_uid: str
    instances: tuple[InstanceFacts, ...]
    calling_aes: frozenset[str]
    called_aes: frozenset[str]
    mismatches: frozenset[str]
    now: datetime


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    matched: bool
    why: str


@dataclass(frozen=True)
class Delivery:
    destination: str
    coerce: Coerce | None
    rule: str
    report: bool = False  # nnrouter's Comprehensive SR of the study goes along


@dataclass(frozen=True)
class Decision:
    outcomes: tuple[RuleOutcome, ...]
    deliveries: tuple[Delivery, ...]
    hold_rules: tuple[str, ...] = ()
    discard_rules: tuple[str, ...] = ()

    @property
    def hold(self) -> bool:
        return bool(self.hold_rules)

    @property
    def discard(self) -> bool:
        return bool(self.discard_rules)

    def text(self) -> str:
        lines = ["rules:"]
        for o in self.outcomes:
            lines.append(f"  {'MATCH' if o.matched else '-    '} {o.rule}: {o.why}")
        if self.discard:
            lines.append(
                f"discard: yes (rule {', '.join(self.discard_rules)}); discard wins: nothing is forwarded or held"
            )
            return "\n".join(lines)
        lines.append("deliveries:" if self.deliveries else "deliveries: none")
        for d in self.deliveries:
            extra = ""
            if d.coerce is not None:
                what = (["fill view attributes from the prediction"] if d.coerce.fill_from_prediction else []) + [
                    f"set {k}" for k in d.coerce.set
                ]
                extra = f"; coerce: {', '.join(what)}" if what else ""
            extra += "; with nnrouter's SR" if d.report else ""
            lines.append(f"  -> {d.destination} (rule {d.rule}{extra})")
        if self.hold:
            lines.append(f"hold: yes (rule {', '.join(self.hold_rules)}); deliveries wait for release")
        else:
            lines.append("hold: no")
        return "\n".join(lines)


def _share(n: int, total: int, of: str) -> tuple[bool, str]:
    ok = {"any": n > 0, "all": total > 0 and n == total, "none": n == 0}[of]
    return ok, f"on {n} of {_plural(total)} ({of}): {_yes(ok)}"


def _values(raw: Any) -> list[Any]:
    if raw is None:
        return []
    return list(raw) if isinstance(raw, (list, tuple)) else [raw]


def _present(raw: Any) -> bool:
    return any(str(v).strip() for v in _values(raw))


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)):
        try:
            return float(value) == float(expected)
        except (TypeError, ValueError):
            pass
    return str(value).strip() == str(expected).strip()


def _tag_one(t: TagCondition, header: dict[str, Any]) -> tuple[bool, bool]:
    """(satisfied, had a value that is not a number) for one instance."""
    raw = header.get(t.keyword)
    if t.exists is not None:
        return _present(raw) == t.exists, False
    values = _values(raw)
    # A multi-valued attribute matches on any one value or on the whole, backslash-joined.
    whole = ["\\".join(str(v) for v in values)] if len(values) > 1 else []
    if t.equals is not None:
        return any(_equal(v, t.equals) for v in values + whole), False
    if t.in_ is not None:
        return any(_equal(v, e) for v in values + whole for e in t.in_), False
    if t.regex is not None:
        rx = re.compile(t.regex)
        return any(rx.search(str(v).strip()) for v in values + whole), False
    bad = False
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            bad = True
            continue
        if (
            (t.lt is None or x < t.lt)
            and (t.le is None or x <= t.le)
            and (t.gt is None or x > t.gt)
            and (t.ge is None or x >= t.ge)
        ):
            return True, False
    return False, bad


def _tag_test(t: TagCondition) -> str:
    if t.exists is not None:
        return "exists" if t.exists else "is missing or empty"
    if t.equals is not None:
        return f"equals {t.equals!r}"
    if t.in_ is not None:
        return f"in {list(t.in_)!r}"
    if t.regex is not None:
        return f"matches /{t.regex}/"
    ops = (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="))
    return " and ".join(f"{sym} {getattr(t, k):g}" for k, sym in ops if getattr(t, k) is not None)


def _eval(c: Condition, s: StudyFacts) -> tuple[bool, str]:
    total = len(s.instances)
    if c.all_ is not None or c.any_ is not None:
        parts = [_eval(sub, s) for sub in (c.all_ or c.any_ or [])]
        word = "all" if c.all_ is not None else "any"
        ok = all(p for p, _ in parts) if word == "all" else any(p for p, _ in parts)
        return ok, f"{word} of ({'; '.join(w for _, w in parts)}): {_yes(ok)}"
    if c.not_ is not None:
        inner, why = _eval(c.not_, s)
        return not inner, f"not ({why}): {_yes(not inner)}"
    if c.tag is not None:
        t = c.tag
        results = [_tag_one(t, i.header) for i in s.instances]
        ok, share = _share(sum(r for r, _ in results), total, t.of)
        bad = sum(b for _, b in results)
        note = f" (not a number on {_plural(bad)})" if bad else ""
        return ok, f"tag {t.keyword} {_tag_test(t)} {share}{note}"
    if c.calling_ae is not None or c.called_ae is not None:
        which, wanted, seen = (
            ("calling", c.calling_ae, s.calling_aes)
            if c.calling_ae is not None
            else ("called", c.called_ae, s.called_aes)
        )
        ok = bool({a.strip() for a in seen} & {w.strip() for w in wanted or []})
        return ok, f"{which} AE in {', '.join(wanted or [])} (study: {', '.join(sorted(seen)) or 'none'}): {_yes(ok)}"
    if c.modality is not None:
        modalities = {m.strip().upper() for m in c.modality}
        present = {str(i.modality or i.header.get("Modality") or "").strip().upper() for i in s.instances} - {""}
        ok = bool(present & modalities)
        return (
            ok,
            f"modality {', '.join(sorted(modalities))} (study: {', '.join(sorted(present)) or 'none'}): {_yes(ok)}",
        )
    if c.predicted is not None:
        p = c.predicted
        n = sum(i.label in p.class_ and (i.score if i.score is not None else 0.0) >= p.min_score for i in s.instances)
        ok, share = _share(n, total, p.of)
        return ok, f"predicted {'/'.join(p.class_)} >= {p.min_score:.2f} {share}"
    if c.unknown is not None:
        ok, share = _share(sum(i.label == "unknown" for i in s.instances), total, c.unknown.of)
        return ok, f"prediction unknown {share}"
    if c.region is not None:
        r = c.region
        want = r.label.strip().casefold()
        n = sum(any(lab.strip().casefold() == want and sc >= r.min_score for lab, sc in i.regions) for i in s.instances)
        ok = (n > 0) == r.present
        state = "present" if r.present else "absent"
        return ok, f"region {r.label} >= {r.min_score:.2f} {state} (found on {n} of {_plural(total)}): {_yes(ok)}"
    if c.mismatch is not None:
        # "any" means a real mismatch; `uncertain` and `unmapped_procedure` are asked for by name.
        flags = sorted(s.mismatches & set(FlagKind.MISMATCHES if c.mismatch == "any" else c.mismatch))
        ok = bool(flags)
        asked = "any mismatch" if c.mismatch == "any" else f"mismatch {', '.join(c.mismatch)}"
        return ok, f"{asked} (study: {', '.join(sorted(s.mismatches)) or 'none'}): {_yes(ok)}"
    if c.time is not None:
        ok = c.time.contains(s.now)
        local = s.now.astimezone() if s.now.tzinfo is not None else s.now
        return ok, f"time {c.time._describe()} (now {DAYS[local.weekday()]} {local:%H:%M}): {_yes(ok)}"
    raise AssertionError("a validated condition has one test")


def decide(rules: RuleSet, study: StudyFacts) -> Decision:
    """Every rule in priority order, with why it matched or not, and what follows."""
    order = sorted(enumerate(rules.rules), key=lambda ir: (ir[1].priority, ir[0]))
    outcomes: list[RuleOutcome] = []
    matched: list[Rule] = []
    stopped_by: str | None = None
    for _, rule in order:
        if rule.fallback:
            continue
        if stopped_by is not None:
            outcomes.append(RuleOutcome(rule.name, False, f"not evaluated: stopped by {stopped_by}"))
            continue
        if rule.when is None:
            ok, why = True, "no `when`: every study"
        else:
            ok, why = _eval(rule.when, study)
        outcomes.append(RuleOutcome(rule.name, ok, why))
        if ok:
            matched.append(rule)
            if not rule.continue_:
                stopped_by = rule.name
    for rule in rules.rules:
        if rule.fallback:
            if matched:
                outcomes.append(RuleOutcome(rule.name, False, f"fallback not needed: {matched[0].name} matched"))
            else:
                outcomes.append(RuleOutcome(rule.name, True, "fallback: no other rule matched"))
                matched.append(rule)
    discard_rules = tuple(r.name for r in matched if r.then.discard)
    if discard_rules:
        return Decision(tuple(outcomes), (), discard_rules=discard_rules)
    deliveries: dict[str, Delivery] = {}
    for rule in matched:
        for dest in rule.then.forward:
            deliveries.setdefault(dest, Delivery(dest, rule.then.coerce, rule.name, rule.then.report))
    hold_rules = tuple(r.name for r in matched if r.then.hold)
    return Decision(tuple(outcomes), tuple(deliveries.values()), hold_rules=hold_rules)


# --- coercion --------------------------------------------------------------


def _empty(ds: pydicom.Dataset, keyword: str) -> bool:
    if keyword not in ds:
        return True
    value = ds[keyword].value
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return len(value) == 0
    except TypeError:
        return False


def coerce(ds: pydicom.Dataset, spec: Coerce, label: str | None) -> list[str]:
    """Change the forwarded copy in place; returns the keywords that changed.

    Prediction fills only what is empty: a technologist's entry, even a wrong
    one, is theirs to correct, and the PACS should not see it overwritten.
    """
    changed: list[str] = []
    view = codes.classes().get(label or "") if spec.fill_from_prediction else None
    if view is not None:
        if view.body_part_examined and _empty(ds, "BodyPartExamined"):
            ds.BodyPartExamined = view.body_part_examined
            changed.append("BodyPartExamined")
        if view.view_position and _empty(ds, "ViewPosition"):
            ds.ViewPosition = view.view_position
            changed.append("ViewPosition")
        if view.view_code is not None and _empty(ds, "ViewCodeSequence"):
            ds.ViewCodeSequence = [view.view_code.item()]
            changed.append("ViewCodeSequence")
    for keyword, text in spec.set.items():
        before = ds[keyword].value if keyword in ds else None
        setattr(ds, keyword, _set_value(keyword, text))
        if ds[keyword].value != before and keyword not in changed:
            changed.append(keyword)
    return changed
