"""Pictures for the study page: a thumbnail, the class activation map over it, the detected regions drawn on it.

PNG, made on request from the spool's file (decoded at thumbnail size) and
the store's rows; the CAM overlay is the one the worker wrote beside the
prediction. None when there is nothing to show (file gone, not decodable).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from nnrouter.core.store import Detection, Instance, Prediction, Store

THUMB_SIDE = 320
_COLOURS = {
    "head": (66, 135, 245),
    "spine": (245, 66, 200),
    "chest": (66, 245, 120),
    "abdomen": (245, 180, 66),
    "pelvis": (200, 66, 66),
}


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf)


def _instance(store: Store, sop_instance_uid: str) -> Instance | None:
    with store.read() as s:
        return (
            s.execute(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Instance.version.desc())
            )
            .scalars()
            .first()
        )


def thumbnail(store: Store, sop_instance_uid: str, *, regions: bool = False, side: int = THUMB_SIDE) -> bytes | None:
    """The image at ``side`` pixels on its longest side, with the detector's boxes when ``regions``."""
    from nnrouter.pixels.decode import DecodeError, decode_file

    inst = _instance(store, sop_instance_uid)
    if inst is None or not Path(inst.path).exists():
        return None
    try:
        decoded = decode_file(inst.path, max_side=side)
    except DecodeError:
        return None
    image = cv2.cvtColor(decoded.image, cv2.COLOR_GRAY2BGR)
    if regions:
        with store.read() as s:
            boxes = s.execute(select(Detection).where(Detection.instance_id == inst.id)).scalars().all()
        # Boxes are in the original's pixels: scale by the stored size, not the thumbnail's.
        sy = image.shape[0] / max(1, inst.rows or decoded.rows)
        sx = image.shape[1] / max(1, inst.columns or decoded.columns)
        for d in boxes:
            x1, y1, x2, y2 = d.box_px
            colour = _COLOURS.get(d.label, (255, 255, 0))
            p1 = (round(x1 * sx), round(y1 * sy))
            p2 = (round(x2 * sx), round(y2 * sy))
            cv2.rectangle(image, p1, p2, colour, 2)
            cv2.putText(
                image,
                f"{d.label} {d.score:.2f}",
                (p1[0] + 3, p1[1] + 14),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.45,
                colour,
                1,
                cv2.LINE_AA,
            )
    return _png(image)


def cam(store: Store, sop_instance_uid: str) -> bytes | None:
    """The class activation map over the image, as the worker wrote it (None: the model has no CAM output)."""
    inst = _instance(store, sop_instance_uid)
    if inst is None:
        return None
    with store.read() as s:
        path = (
            s.execute(
                select(Prediction.cam_path)
                .where(Prediction.instance_id == inst.id, Prediction.cam_path.is_not(None))
                .order_by(Prediction.id.desc())
            )
            .scalars()
            .first()
        )
    if path is None or not Path(path).exists():
        return None
    return Path(path).read_bytes()
