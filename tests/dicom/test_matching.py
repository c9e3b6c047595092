"""The shared matching rules (PS3.4 C.2.2.2): as SQL patterns for the store, and on in-memory values."""

from __future__ import annotations

from pydicom.dataelem import DataElement

from nnrouter.dicom.matching import (
    date_range,
    element_matches,
    element_values,
    glob_pattern,
    int_matches,
    key_problem,
    like_pattern,
    query_values,
    time_matches,
    wildcard_match,
)


def test_wildcards_become_escaped_patterns():
    assert like_pattern("DOE*") == "DOE%"
    assert like_pattern("D?E") == "D_E"
    assert like_pattern("100%_a\\b*") == "100\\%\\_a\\\\b%"
    assert glob_pattern("A[1]*") == "A[[]1]*"
    assert wildcard_match("D?E*", "DOE^JOHN")
    assert not wildcard_match("d?e*", "DOE^JOHN")
    assert wildcard_match("d?e*", "DOE^JOHN", ignore_case=True)
    assert wildcard_match("A.B", "A.B") and not wildcard_match("A.B", "AxB")  # regex characters are literal
    assert not wildcard_match("*", None)


def test_query_values_and_ranges():
    assert query_values(None) is None
    assert query_values("") is None
    assert query_values("*") is None  # a lone * is universal matching
    assert query_values(["1.2", "", "1.3 "]) == ["1.2", "1.3"]
    assert query_values(b"A\\B ") == ["A", "B"]
    assert date_range("20240101-20240131") == ("20240101", "20240131")
    assert date_range("20240101-") == ("20240101", None)
    assert date_range("-20240101") == (None, "20240101")
    assert date_range("2024.01.01") == ("20240101", "20240101")


def test_time_ranges_cover_the_span_a_partial_time_names():
    assert time_matches("1000-1200", "120059.5")
    assert not time_matches("1000-1200", "130000")
    assert time_matches("-0930", "093000")
    assert time_matches("12", "124500")
    assert not time_matches("0930-", "0929")
    assert not time_matches("0930-", None)


def test_numbers_match_as_numbers():
    assert int_matches("3", "03") and int_matches("3", 3.0)
    assert not int_matches("3", "") and not int_matches("3", None) and not int_matches("x", "3")


def test_in_memory_values_and_keys():
    assert element_values(DataElement(0x00080018, "UI", "")) == []
    assert element_values(DataElement(0x00280010, "US", 512)) == ["512"]
    assert element_values(DataElement(0x00181164, "DS", [0.5, 1.0])) == ["0.5", "1"]
    # A list of UIDs matches any of them; other multi-valued keys match value by value.
    assert element_matches("UI", ["1.2", "1.3"], ["1.3"])
    assert not element_matches("UI", ["1.2"], ["1.3"])
    assert element_matches("CS", ["A", "B"], ["A", "B"]) and not element_matches("CS", ["A", "B"], ["A"])
    assert element_matches("US", ["2"], ["2.0"])
    assert element_matches("DA", ["20240101-20241231"], ["20240501"])
    assert not element_matches("DA", ["2025-"], ["20240501"])
    assert element_matches("DT", ["20240101-"], ["20240501120000"])
    assert element_matches("DT", ["20240501120000+0200"], ["20240501120000+0200"])  # an offset is no range
    assert element_matches("LO", ["XR K*"], ["XR KNEE"]) and not element_matches("LO", ["XR K*"], [])
    assert key_problem("UI", ["1.2.*"]) == "no wildcards in a UI key"
    assert key_problem("US", ["two"]) == "'two' is not a number"
    assert key_problem("DA", ["2024/01/01"]) == "'2024/01/01' is not a DA value or range"
    assert key_problem("LO", ["XR *"]) is None and key_problem("DA", ["20240101-"]) is None
