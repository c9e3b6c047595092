"""The model folders on disk as an operator looks at them: listed with their cards, verified, tried on files.

``nnrouter models list|verify|run`` print these rows; the service itself
loads models through ``nnrouter.pixels.runtime`` and never reads this.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def model_dirs(root: Path) -> list[Path]:
    """Every folder under ``root`` holding a model card."""
    return sorted(p.parent for p in Path(root).glob("*/model.yaml"))


def list_models(root: Path) -> list[dict[str, Any]]:
    """One row a model folder: its card in short, or why the card cannot be used (``error``)."""
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    rows: list[dict[str, Any]] = []
    for d in model_dirs(root):
        try:
            card = load_card(d)
            rows.append(
                {
                    "path": str(d),
                    "name": card.name,
                    "version": card.version,
                    "task": card.task,
                    "labels": len(card.labels),
                    "sha256": card.sha256[:12],
                }
            )
        except ModelCardError as exc:
            rows.append({"path": str(d), "error": str(exc)})
    return rows


def verify_models(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Each model's weights against its card: ``ok`` with the sha256, or the ``error``."""
    from nnrouter.pixels.modelcard import ModelCardError, verify

    rows: list[dict[str, Any]] = []
    for d in dirs:
        try:
            rows.append({"path": str(d), "ok": True, "sha256": verify(d)})
        except ModelCardError as exc:
            rows.append({"path": str(d), "ok": False, "error": str(exc)})
    return rows


def read_image(path: Path, max_side: int) -> np.ndarray:
    """A DICOM file through the serving decode path, or a PNG/JPEG as 8-bit gray."""
    import cv2

    from nnrouter.pixels.decode import decode_file

    if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg"):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"{path}: not a readable image")
        return img
    return decode_file(path, max_side=max_side).image


def run_model(model: Any, files: Iterable[Path], max_side: int = 1024) -> list[dict[str, Any]]:
    """What a loaded model (runtime.Model) makes of each file; a file that cannot be read gets an ``error``."""
    from nnrouter.pixels.decode import DecodeError

    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            img = read_image(f, max_side)
        except (DecodeError, ValueError) as exc:
            rows.append({"file": str(f), "error": str(exc)})
            continue
        if model.card.task == "classify":
            c = model.classify([img])[0]
            rows.append(
                {
                    "file": str(f),
                    "label": c.label,
                    "score": float(c.score),
                    "top": [[label, float(score)] for label, score in c.top],
                    "provider": model.provider,
                }
            )
        else:
            found = model.detect([img])[0]
            rows.append(
                {
                    "file": str(f),
                    "provider": model.provider,
                    "regions": [
                        {"label": d.label, "score": float(d.score), "box": [float(v) for v in d.box]} for d in found
                    ],
                }
            )
    return rows
