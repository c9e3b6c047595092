"""Views as JSON, the one way: what the CLI prints with ``--json`` and what the API answers are the same text.

Values JSON has no type for (datetimes, paths) are written as ``str()``
writes them, as the CLI always has; scripts reading either see one format.
"""

from __future__ import annotations

import json
from typing import Any


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, sort_keys=False, default=str)


def plain(obj: Any) -> Any:
    """``obj`` as the JSON types only, exactly as ``dumps`` writes it."""
    return json.loads(dumps(obj))
