"""What an order expects to see: procedures.yaml, edited by radiology admins.

Each entry maps procedure codes (LOINC, or local codes) and free-text
patterns for local descriptions to the view classes the procedure should
produce, with counts. An order that matches no entry is reported as
unmapped; nnrouter never guesses what it expects.

Single-view LOINC codes listed in classes.csv (``order_loinc``) are known
without an entry: code X orders one image of the class whose row lists X.
An entry in the file wins over that default.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nnrouter.core import codes, yamlfile
from nnrouter.orders.order import Order


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcedureCode(_Model):
    value: str = Field(min_length=1)
    scheme: str = Field("LN", min_length=1, description="Coding Scheme Designator: LN for LOINC, or the local one")


class Procedure(_Model):
    name: str = Field(min_length=1)
    codes: list[ProcedureCode] = []
    patterns: list[str] = Field(
        [], description="regular expressions searched in the order's description, case-insensitive"
    )
    expect: dict[str, int] = Field(description="view class -> how many images of it")

    @field_validator("patterns")
    @classmethod
    def _regex(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
        return value

    @field_validator("expect")
    @classmethod
    def _classes(cls, value: dict[str, int]) -> dict[str, int]:
        known = codes.classes()
        for name, n in value.items():
            if name not in known:
                raise ValueError(f"unknown view class {name!r}; the classes are those of classes.csv")
            if n < 1:
                raise ValueError(f"{name}: count must be at least 1")
        if not value:
            raise ValueError("expect at least one view")
        return value

    @model_validator(mode="after")
    def _findable(self) -> Procedure:
        if not self.codes and not self.patterns:
            raise ValueError("give codes or patterns, or the procedure can never match an order")
        return self


class Procedures(_Model):
    # Derive single-view procedures from classes.csv's order_loinc column.
    class_codes: bool = True
    procedures: list[Procedure] = []

    @model_validator(mode="after")
    def _unique(self) -> Procedures:
        seen: dict[str, str] = {}
        for p in self.procedures:
            if p.name in seen:
                raise ValueError(f"procedure name {p.name!r} is used twice")
            seen[p.name] = p.name
        return self


@dataclass(frozen=True)
class Expectation:
    """What one order expects, or why nothing is known."""

    order: Order
    procedure: str | None  # None: unmapped
    views: Counter[str]
    matched_by: str  # "code LN 36643-5", "pattern ...", or why unmapped


class ProcedureBook:
    """The loaded procedures, ready to answer 'what does this order expect'."""

    def __init__(self, spec: Procedures):
        self.spec = spec
        self._by_code: dict[tuple[str, str], Procedure] = {}
        if spec.class_codes:
            for vc in codes.classes().values():
                for c in vc.order_codes:
                    key = (c.scheme.upper(), c.value)
                    self._by_code.setdefault(
                        key,
                        Procedure(
                            name=f"{vc.name} (classes.csv {c.value})",
                            codes=[ProcedureCode(value=c.value, scheme=c.scheme)],
                            expect={vc.name: 1},
                        ),
                    )
        for p in spec.procedures:  # the file wins over classes.csv
            for pc in p.codes:
                self._by_code[(pc.scheme.upper(), pc.value)] = p
        self._patterns = [(re.compile(pat, re.IGNORECASE), pat, p) for p in spec.procedures for pat in p.patterns]

    def expect(self, order: Order) -> Expectation:
        for c in order.codes:
            p = self._by_code.get((c.scheme.upper(), c.value))
            if p is not None:
                return Expectation(order, p.name, Counter(p.expect), f"code {c.scheme} {c.value}")
        text = " ".join(t for t in (order.description, *(c.meaning for c in order.codes)) if t)
        for rx, pat, p in self._patterns:
            if text and rx.search(text):
                return Expectation(order, p.name, Counter(p.expect), f"pattern {pat!r}")
        what = ", ".join(f"{c.scheme} {c.value}" for c in order.codes) or "no codes"
        return Expectation(order, None, Counter(), f"no procedure for {what}, description {order.description!r}")


def load_procedures(path: Path, text: str | None = None) -> ProcedureBook:
    """Read and validate procedures.yaml (or ``text``, its content); raises yamlfile.FileProblems with file, line and field."""
    spec = yamlfile.validate(Procedures, Path(path), text)
    assert isinstance(spec, Procedures)
    return ProcedureBook(spec)
