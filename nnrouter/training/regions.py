"""Region boxes for training and evaluating the detector, from the three layouts people bring.

A hospital's boxes come out of whatever tool drew them: a CSV like the shared
``regions.csv``, a COCO JSON, or a YOLO folder. All three are read into one
typed form, and every box is checked on the way in (inside its image, not
empty, a region nnrouter knows), because a box off by a transposition trains
a detector that is wrong in a way no metric on the same data will show.
Errors name the file and line, since the person who fixes them edits that file.

The source group of a box (what the held-out-source evaluation holds out) is
the repository owner: the part before ``/`` of a ``source_repo`` column, or
the ``<owner>__`` prefix of the file name that the shared data uses. Both give
the same group for the same image, so the three layouts agree.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2

__all__ = ["REGIONS", "Box", "RegionsError", "group_of", "image_size", "read_regions"]

# The body regions of the routing rules (rules.Region); labels are kept upper case.
REGIONS = ("HEAD", "SPINE", "CHEST", "ABDOMEN", "PELVIS")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Coordinates converted between layouts (YOLO's normalised fractions, COCO's
# xywh) pick up rounding; a box this far over the edge is clipped, not refused.
EDGE_TOLERANCE_PX = 0.5


class RegionsError(ValueError):
    """Annotations that cannot be trained on, located to file and line."""


@dataclass(frozen=True)
class Box:
    file: str  # absolute path of the image
    label: str  # one of REGIONS
    x0: float  # pixels of the image as stored, x0 < x1, y0 < y1
    y0: float
    x1: float
    y1: float
    group: str  # source of the image (see the module docstring)


def read_regions(path: str | os.PathLike[str]) -> list[Box]:
    """Boxes from a CSV (``file,label,x0,y0,x1,y1[,source_repo]``), a COCO JSON, or a YOLO folder."""
    path = Path(path)
    if path.is_dir():
        return _read_yolo(path)
    if not path.is_file():
        raise RegionsError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".json":
        return _read_coco(path)
    return _read_csv(path)


def group_of(file: str | os.PathLike[str], source_repo: str | None = None) -> str:
    """The source group: the owner of ``source_repo``, else the ``<owner>__`` file prefix, else the folder."""
    if source_repo and source_repo.strip():
        return source_repo.strip().split("/")[0]
    name = Path(file).name
    if "__" in name:
        return name.split("__", 1)[0]
    return Path(file).parent.name or "unknown"


def image_size(file: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image; PNG sizes come from the header, without decoding."""
    p = Path(file)
    with open(p, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("not a readable image")
    return img.shape[1], img.shape[0]


class _Checker:
    """Validates boxes one by one; caches image sizes, since one image often has several boxes."""

    def __init__(self) -> None:
        self.sizes: dict[str, tuple[int, int]] = {}

    def box(
        self,
        at: str,
        file: Path,
        label: str,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        group: str,
        size: tuple[int, int] | None = None,
    ) -> Box:
        """One checked box; ``at`` is the ``file:line`` that errors start with."""
        name = label.strip().upper()
        if name not in REGIONS:
            raise RegionsError(f"{at}: unknown label {label!r}; known: {', '.join(REGIONS)} (any case)")
        key = str(file)
        if key not in self.sizes:
            if not file.is_file():
                raise RegionsError(f"{at}: image {file} not found")
            try:
                self.sizes[key] = image_size(file)
            except (OSError, ValueError) as exc:
                raise RegionsError(f"{at}: image {file}: {exc}") from None
        w, h = self.sizes[key]
        if size is not None and tuple(size) != (w, h):
            raise RegionsError(f"{at}: the annotation says the image is {size[0]}x{size[1]}, {file} is {w}x{h}")
        if not (x1 > x0 and y1 > y0):
            raise RegionsError(f"{at}: empty box: need x1 > x0 and y1 > y0, got x0={x0} y0={y0} x1={x1} y1={y1}")
        t = EDGE_TOLERANCE_PX
        if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
            raise RegionsError(f"{at}: box ({x0}, {y0}, {x1}, {y1}) reaches outside the {w}x{h} image {file.name}")
        return Box(key, name, max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1), group)


def _number(at: str, name: str, text: object) -> float:
    try:
        v = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RegionsError(f"{at}: {name} is not a number: {text!r}") from None
    if not math.isfinite(v):
        raise RegionsError(f"{at}: {name} is not a finite number: {text!r}")
    return v


def _read_csv(path: Path) -> list[Box]:
    check = _Checker()
    boxes = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file", "label", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
        if missing:
            raise RegionsError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            line = reader.line_num
            at = f"{path}:{line}"
            file = (path.parent / (row["file"] or "")).resolve()
            x0, y0, x1, y1 = (_number(at, k, row[k]) for k in ("x0", "y0", "x1", "y1"))
            group = group_of(file, row.get("source_repo"))
            boxes.append(check.box(at, file, row["label"] or "", x0, y0, x1, y1, group))
    if not boxes:
        raise RegionsError(f"{path}: no boxes")
    return boxes


def _json_lines(path: Path) -> dict[tuple, int]:
    """Line of each JSON node, for error messages only (JSON is YAML, and PyYAML keeps positions)."""
    from nnrouter.core import yamlfile

    try:
        _, positions = yamlfile.load(path)
    except yamlfile.FileProblems:
        return {}
    return {k: v[0] for k, v in positions.items()}


def _read_coco(path: Path) -> list[Box]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegionsError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    lines: dict[tuple, int] | None = None

    def at(*loc: object) -> str:
        nonlocal lines
        if lines is None:
            lines = _json_lines(path)
        probe = tuple(loc)
        while probe and probe not in lines:
            probe = probe[:-1]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        return f"{lines.get(probe, 1)}: {where}"

    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise RegionsError(f"{path}:1: a COCO file needs lists 'images', 'annotations' and 'categories'")
    check = _Checker()
    cats = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise RegionsError(f"{path}:{at('categories', i)}: a category needs 'id' and 'name'")
        cats[c["id"]] = str(c["name"])
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise RegionsError(f"{path}:{at('images', i)}: an image needs 'id' and 'file_name'")
        size = (int(im["width"]), int(im["height"])) if "width" in im and "height" in im else None
        images[im["id"]] = (path.parent / im["file_name"]).resolve(), size
    boxes = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise RegionsError(f"{path}:{at('annotations', i)}: an annotation must be an object")
        if a.get("image_id") not in images:
            raise RegionsError(
                f"{path}:{at('annotations', i, 'image_id')}: image_id {a.get('image_id')!r} is not in images"
            )
        if a.get("category_id") not in cats:
            raise RegionsError(
                f"{path}:{at('annotations', i, 'category_id')}: category_id {a.get('category_id')!r} is not in categories"
            )
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise RegionsError(f"{path}:{at('annotations', i, 'bbox')}: bbox must be [x, y, width, height]")
        where = f"{path}:{at('annotations', i, 'bbox')}"
        x, y, w, h = (_number(where, n, v) for n, v in zip(("x", "y", "width", "height"), bbox))
        file, size = images[a["image_id"]]
        boxes.append(check.box(where, file, cats[a["category_id"]], x, y, x + w, y + h, group_of(file), size))
    if not boxes:
        raise RegionsError(f"{path}: no annotations")
    return boxes


def _yolo_names(root: Path) -> tuple[Path, list[str]]:
    for name in ("classes.txt", "obj.names", "names.txt", "classes.names"):
        p = root / name
        if p.is_file():
            return p, [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        p = root / name
        if p.is_file():
            import yaml

            names = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("names")
            if isinstance(names, dict):  # Ultralytics writes {0: name, 1: name}
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list):
                return p, [str(n) for n in names]
    raise RegionsError(f"{root}: a YOLO folder needs classes.txt (one class name a line) or data.yaml with names")


def _read_yolo(root: Path) -> list[Box]:
    names_file, names = _yolo_names(root)
    check = _Checker()
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise RegionsError(f"{root}: no images found")
    boxes = []
    for img in images:
        rel = img.relative_to(root)
        # Beside the image, or under labels/ mirroring images/ (the Ultralytics layout).
        beside = img.with_suffix(".txt")
        parts = list(rel.parts)
        mirrored = root / Path(*["labels" if p == "images" else p for p in parts]).with_suffix(".txt")
        label_file = beside if beside.is_file() else mirrored if mirrored.is_file() else None
        if label_file is None:
            continue  # an image without a label file is one with nothing boxed
        w, h = image_size(img)
        for n, text in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            fields = text.split()
            if not fields:
                continue
            at = f"{label_file}:{n}"
            if len(fields) != 5:
                raise RegionsError(f"{at}: expected 'class cx cy w h' (5 fields), got {len(fields)}")
            try:
                k = int(fields[0])
            except ValueError:
                raise RegionsError(f"{at}: class {fields[0]!r} is not an integer") from None
            if not 0 <= k < len(names):
                raise RegionsError(f"{at}: class {k} is not in {names_file} ({len(names)} names)")
            cx, cy, bw, bh = (_number(at, c, v) for c, v in zip(("cx", "cy", "w", "h"), fields[1:]))
            if not all(0.0 <= v <= 1.0 for v in (cx, cy, bw, bh)):
                raise RegionsError(f"{at}: YOLO coordinates are fractions of the image, 0..1; got {fields[1:]}")
            boxes.append(
                check.box(
                    at,
                    img.resolve(),
                    names[k],
                    (cx - bw / 2) * w,
                    (cy - bh / 2) * h,
                    (cx + bw / 2) * w,
                    (cy + bh / 2) * h,
                    group_of(img),
                )
            )
    if not boxes:
        raise RegionsError(f"{root}: no boxes in any label file")
    return boxes
