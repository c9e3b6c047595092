"""Hanging Protocol Information Model FIND (PS3.4 Annex U) over nnrouter's protocol instances.

The protocols themselves are results (``nnrouter.results.hanging`` builds
them from the class table); answering a viewer's query for them is a
network service like the query over the store, so it lives here, bound on
the one AE by ``nnrouter.dicom.scp``. The protocols are few and in memory:
matching is done on the data sets themselves, with the shared rules of
``nnrouter.dicom.matching``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pynetdicom.sop_class import HangingProtocolInformationModelFind

from nnrouter.dicom.matching import element_matches, element_values, key_problem
from nnrouter.dicom.statuses import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    PENDING,
    UNABLE_TO_PROCESS,
    with_comment,
)
from nnrouter.results import hanging

__all__ = ["Protocols", "QueryError", "find", "handle_find"]

_CHARSET = Tag(0x0008, 0x0005)  # Specific Character Set
_LEVEL = Tag(0x0008, 0x0052)  # Query/Retrieve Level
# Attributes that steer the query rather than match: echoed, never matched.
_CONTROL = frozenset({_CHARSET, _LEVEL})


class QueryError(ValueError):
    """The identifier cannot be matched as the Hanging Protocol model defines: a malformed query."""


class Protocols:
    """The generic protocols the AE answers for, built on the first query (the class table is read once)."""

    def __init__(self, protocols: Iterable[Dataset] | None = None):
        self._protocols = list(protocols) if protocols is not None else None

    def get(self) -> list[Dataset]:
        if self._protocols is None:
            self._protocols = hanging.generic_protocols()
        return self._protocols

    def handle_find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        return handle_find(event, self.get())


def find(identifier: Dataset, protocols: Iterable[Dataset]) -> Iterator[Dataset]:
    """The responses to a Hanging Protocol FIND: one per matching protocol, requested keys only.

    Matching follows PS3.4 C.2.2.2: an empty key matches everything, a UID
    key may be a list, string keys take * and ?, dates and times take
    ranges, a sequence key's item matches if any item of the protocol's
    sequence matches all its keys. Responses carry exactly the keys asked
    for, filled from the protocol, plus Specific Character Set (so the SCU
    can decode them) and Query/Retrieve Level when the query carried one.
    Raises :class:`QueryError` before the first response if the
    identifier is malformed.
    """
    _check(identifier)
    for p in protocols:
        if _match_dataset(identifier, p):
            yield _response(identifier, p)


def handle_find(event: Any, protocols: Iterable[Dataset]) -> Iterator[tuple[Any, Dataset | None]]:
    """pynetdicom EVT_C_FIND handler for the Hanging Protocol model.

    Bind with ``(evt.EVT_C_FIND, handle_find, [protocols])``. Failures:
    Identifier Does Not Match SOP Class for a malformed identifier (or
    another model), Unable to Process for one that cannot be decoded;
    Cancel when the SCU cancels.
    """
    if event.request.AffectedSOPClassUID != HangingProtocolInformationModelFind:
        yield (
            with_comment(
                IDENTIFIER_DOES_NOT_MATCH, f"not the Hanging Protocol FIND model: {event.request.AffectedSOPClassUID}"
            ),
            None,
        )
        return
    try:
        identifier = event.identifier
    except Exception as exc:
        yield with_comment(UNABLE_TO_PROCESS, f"identifier could not be decoded: {type(exc).__name__}"), None
        return
    try:
        matches = list(find(identifier, protocols))
    except QueryError as exc:
        yield with_comment(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    for m in matches:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, m


def _check(query: Dataset, depth: int = 0) -> None:
    for elem in query:
        if elem.tag in _CONTROL and depth == 0:
            continue
        if elem.VR == "SQ":
            if len(elem.value) > 1:
                raise QueryError(f"{elem.keyword or elem.tag}: a sequence key holds at most one item")
            for item in elem.value:
                _check(item, depth + 1)
            continue
        values = element_values(elem)
        problem = key_problem(elem.VR, values) if values else None
        if problem:
            raise QueryError(f"{elem.keyword or elem.tag}: {problem}")


def _match_dataset(query: Dataset, target: Dataset) -> bool:
    for elem in query:
        if elem.tag in _CONTROL:
            continue
        have = target.get(elem.tag)
        if elem.VR == "SQ":
            if not elem.value or not _has_keys(elem.value[0]):
                continue  # universal
            if have is None or have.VR != "SQ" or not any(_match_dataset(elem.value[0], it) for it in have.value):
                return False
            continue
        wanted = element_values(elem)
        if not wanted or wanted == ["*"]:
            continue  # a lone * is the same as an empty key
        if have is None or not element_matches(elem.VR, wanted, element_values(have)):
            return False
    return True


def _has_keys(item: Dataset) -> bool:
    """Whether a sequence key's item carries any non-empty key (else it is a universal match)."""
    for elem in item:
        if elem.VR == "SQ":
            if elem.value and _has_keys(elem.value[0]):
                return True
        elif element_values(elem) not in ([], ["*"]):
            return True
    return False


def _response(query: Dataset, target: Dataset) -> Dataset:
    out = Dataset()
    if "SpecificCharacterSet" in target:
        out.SpecificCharacterSet = target.SpecificCharacterSet
    _fill(query, target, out, top=True)
    return out


def _fill(query: Dataset, target: Dataset, out: Dataset, *, top: bool = False) -> None:
    for elem in query:
        if top and elem.tag == _CHARSET:
            continue
        if top and elem.tag == _LEVEL:
            out.add_new(elem.tag, elem.VR, elem.value)
            continue
        have = target.get(elem.tag)
        if elem.VR == "SQ":
            if have is None or have.VR != "SQ":
                out.add_new(elem.tag, "SQ", Sequence())
            elif not elem.value:
                out.add_new(elem.tag, "SQ", Sequence([_copy(it) for it in have.value]))
            else:
                keyed = _has_keys(elem.value[0])
                items = []
                for it in have.value:
                    if keyed and not _match_dataset(elem.value[0], it):
                        continue
                    sub = Dataset()
                    _fill(elem.value[0], it, sub)
                    items.append(sub)
                out.add_new(elem.tag, "SQ", Sequence(items))
        elif have is None:
            out.add_new(elem.tag, elem.VR, None)
        else:
            out.add_new(elem.tag, have.VR, have.value)


def _copy(item: Dataset) -> Dataset:
    new = Dataset()
    for elem in item:
        if elem.VR == "SQ":
            new.add_new(elem.tag, "SQ", Sequence([_copy(i) for i in elem.value]))
        else:
            new.add_new(elem.tag, elem.VR, elem.value)
    return new
