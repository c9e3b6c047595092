"""The Models page: each configured model's card, its evaluation, the classes it covers and those it does not.

The confusion matrix is drawn from the card's leave-one-source-out table
(each class measured on a source the model did not train on: what it was
taken for, ``missed_as``), the held-out figures the card keeps. The card
keeps the calibration error (ECE) but not the reliability bins, so no
calibration curve is drawn: the page says so rather than invent one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nnrouter.core import codes
from nnrouter.core.config import Settings

ROLES = ("classifier", "detector")


def describe(settings: Settings) -> list[dict[str, Any]]:
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    out = []
    every = list(codes.nncpr_labels())
    for role in ROLES:
        path = getattr(settings.models, role)
        if path is None:
            out.append({"role": role, "configured": False})
            continue
        try:
            card = load_card(path)
        except ModelCardError as exc:
            out.append({"role": role, "configured": True, "path": str(path), "error": str(exc)})
            continue
        covered = [label for label in card.labels if label != "unknown"]
        entry: dict[str, Any] = {
            "role": role,
            "configured": True,
            "path": str(path),
            "name": card.name,
            "version": card.version,
            "task": card.task,
            "sha256": card.sha256,
            "provenance": card.provenance,
            "licence": card.licence,
            "labels": card.labels,
            "not_covered": card.not_covered
            if card.not_covered
            else ([c for c in every if c not in covered] if card.task == "classify" else []),
            "limitations": card.limitations,
            "metrics": card.metrics,
            "unknown_threshold": card.unknown_threshold,
            "has_confusion": _confusion(card.metrics) is not None,
        }
        out.append(entry)
    return out


def _confusion(metrics: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray] | None:
    """(true classes, predicted columns, counts) from the leave-one-source-out table; None without one."""
    table = (metrics.get("leave_one_source_out") or {}).get("table") or {}
    if not table:
        return None
    rows = sorted(table)
    cols = list(rows)
    counts: dict[tuple[str, str], float] = {}
    for true, by_source in table.items():
        for fig in by_source.values():
            n = int(fig.get("n") or 0)
            missed = fig.get("missed_as") or {}
            right = n - sum(int(v) for v in missed.values())
            counts[(true, true)] = counts.get((true, true), 0) + right
            for pred, k in missed.items():
                if pred not in cols:
                    cols.append(pred)
                counts[(true, pred)] = counts.get((true, pred), 0) + int(k)
    m = np.array([[counts.get((r, c), 0) for c in cols] for r in rows], dtype=float)
    return rows, cols, m


def confusion_png(settings: Settings, role: str) -> bytes | None:
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    path = getattr(settings.models, role, None) if role in ROLES else None
    if path is None or not Path(path).exists():
        return None
    try:
        card = load_card(path)
    except ModelCardError:
        return None
    found = _confusion(card.metrics)
    if found is None:
        return None
    rows, cols, m = found
    cell, left, top = 54, 190, 150
    h, w = top + cell * len(rows) + 20, left + cell * len(cols) + 20
    img = np.full((h, w, 3), 255, np.uint8)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, r in enumerate(rows):
        cv2.putText(img, r[:24], (6, top + i * cell + cell // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(len(cols)):
            shade = int(255 - 200 * share[i, j])
            x, y = left + j * cell, top + i * cell
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (255, shade, shade), -1)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (180, 180, 180), 1)
            colour = (255, 255, 255) if share[i, j] > 0.6 else (0, 0, 0)
            cv2.putText(img, f"{int(m[i, j])}", (x + 8, y + cell // 2 + 4), font, 0.45, colour, 1, cv2.LINE_AA)
    for j, c in enumerate(cols):
        label = np.full((cell, top - 10, 3), 255, np.uint8)
        cv2.putText(label, c[:22], (4, cell // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
        img[0 : top - 10, left + j * cell : left + (j + 1) * cell] = rotated
    cv2.putText(img, "true class (rows) vs predicted, held-out sources", (6, 14), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    return bytes(buf) if ok else None
