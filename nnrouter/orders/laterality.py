"""Laterality as an order states it in words.

HL7 orders and worklist entries rarely carry a coded laterality; the side is
in the procedure text ("XR Knee AP and Lateral LEFT", "Hand RT"). Every order
source reads it the same way, here, so that a knee ordered "LT" and imaged
with ImageLaterality R is a mismatch whichever way the order arrived.
"""

from __future__ import annotations

import re

__all__ = ["laterality_from_text"]

_WORDS = {
    "LEFT": "L",
    "LT": "L",
    "RIGHT": "R",
    "RT": "R",
    "BILATERAL": "B",
    "BILAT": "B",
    "BOTH": "B",
}
# Whole words only: "LT" in "ADULT" or "RT" in "HEART" says nothing about a side.
_PATTERN = re.compile(r"(?<![A-Z0-9])(" + "|".join(sorted(_WORDS, key=len, reverse=True)) + r")(?![A-Z0-9])")


def laterality_from_text(text: str | None) -> str | None:
    """ "L", "R", "B" (both) or None when the text names no side.

    A text naming both sides ("left and right hands") orders both, so it
    reads as "B" rather than whichever word came first.
    """
    if not text:
        return None
    sides = {_WORDS[m] for m in _PATTERN.findall(text.upper())}
    if not sides:
        return None
    if "B" in sides or sides == {"L", "R"}:
        return "B"
    return sides.pop()
