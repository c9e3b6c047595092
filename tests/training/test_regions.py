"""Region boxes read from CSV, COCO and YOLO: the same annotations give the same boxes, and bad ones are refused.

The COCO and YOLO files are written here by hand from real rows of the
shared regions.csv (not by nnrouter), so a reader bug cannot cancel a writer bug.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import SHARED

from nnrouter.training.regions import Box, RegionsError, image_size, read_regions

REGIONS_CSV = SHARED / "data" / "regions" / "regions.csv"
needs_regions = pytest.mark.skipif(not REGIONS_CSV.is_file(), reason=f"{REGIONS_CSV} is absent")


def real_rows(n_per_source: int = 4) -> list[dict]:
    """A few rows of each source, the whole-spine ones (files under ../radiographs) included."""
    with open(REGIONS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    picked: dict[str, list[dict]] = {}
    for r in rows:
        if len(picked.setdefault(r["source_repo"], [])) < n_per_source:
            picked[r["source_repo"]].append(r)
    out = [r for rs in picked.values() for r in rs]
    for r in out:
        r["path"] = (REGIONS_CSV.parent / r["file"]).resolve()
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "x0", "y0", "x1", "y1", "source_repo"])
        for r in rows:
            w.writerow([r["path"], r["label"], r["x0"], r["y0"], r["x1"], r["y1"], r["source_repo"]])
    return path


def write_coco(rows: list[dict], path: Path) -> Path:
    names = sorted({r["label"] for r in rows})
    files = sorted({str(r["path"]) for r in rows})
    images = []
    for i, f in enumerate(files, start=1):
        w, h = image_size(f)
        images.append({"id": i, "file_name": f, "width": w, "height": h})
    ids = {f: i for i, f in enumerate(files, start=1)}
    anns = []
    for k, r in enumerate(rows, start=1):
        x0, y0, x1, y1 = (float(r[c]) for c in ("x0", "y0", "x1", "y1"))
        anns.append(
            {
                "id": k,
                "image_id": ids[str(r["path"])],
                "category_id": names.index(r["label"]) + 7,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
        )
    cats = [{"id": i + 7, "name": n} for i, n in enumerate(names)]  # ids need not start at 0
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}, indent=2))
    return path


def write_yolo(rows: list[dict], root: Path) -> Path:
    """Ultralytics layout: images/X.png (links to the real films), labels/X.txt, classes.txt."""
    names = sorted({r["label"] for r in rows})
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for r in rows:
        img = root / "images" / r["path"].name
        if not img.exists():
            img.symlink_to(r["path"])
        w, h = image_size(r["path"])
        x0, y0, x1, y1 = (float(r[c]) for c in ("x0", "y0", "x1", "y1"))
        line = f"{names.index(r['label'])} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n"
        with open(root / "labels" / (img.stem + ".txt"), "a") as f:
            f.write(line)
    return root


def key(b: Box) -> tuple:
    return (b.file, b.label, b.group)


@needs_regions
def test_csv_coco_and_yolo_give_the_same_boxes(tmp_path):
    rows = real_rows()
    assert any("whole_spine_ap" in str(r["path"]) for r in rows)  # a file outside regions/images
    from_csv = read_regions(write_csv(rows, tmp_path / "boxes.csv"))
    from_coco = read_regions(write_coco(rows, tmp_path / "boxes.json"))
    from_yolo = read_regions(write_yolo(rows, tmp_path / "yolo"))
    assert len(from_csv) == len(rows) == len(from_coco) == len(from_yolo)
    for other, tol in ((from_coco, 1e-6), (from_yolo, 1e-3)):  # YOLO's 6 decimals of a 512 px image
        a, b = sorted(from_csv, key=key), sorted(other, key=key)
        assert [key(x) for x in a] == [key(x) for x in b]
        for x, y in zip(a, b):
            assert (x.x0, x.y0, x.x1, x.y1) == pytest.approx((y.x0, y.y0, y.x1, y.y1), abs=tol)
    # The typed form: upper-case region names, owner of the source repository as the group.
    assert {b.label for b in from_csv} == {"HEAD", "SPINE"}
    assert {b.group for b in from_csv} == {"Znarfran", "zlinzju", "vpouramin"}
    r0 = rows[0]
    b0 = next(b for b in from_csv if b.file == str(r0["path"]))
    assert (b0.x0, b0.y0, b0.x1, b0.y1) == (float(r0["x0"]), float(r0["y0"]), float(r0["x1"]), float(r0["y1"]))


@needs_regions
def test_the_shared_csv_reads_whole():
    boxes = read_regions(REGIONS_CSV)
    assert len(boxes) == 671
    assert sum(b.label == "SPINE" for b in boxes) == 525
    assert all(Path(b.file).is_file() for b in boxes[::50])


@needs_regions
def test_csv_errors_name_file_and_line(tmp_path):
    rows = real_rows(1)
    w, _ = image_size(rows[1]["path"])  # the file of line 3
    bad = [dict(rows[0]), dict(rows[1]), dict(rows[2])]
    path = write_csv(bad, tmp_path / "a.csv")
    good = path.read_text()
    lines = good.splitlines()

    def refused(line2: str, *needles: str) -> None:
        p = tmp_path / "b.csv"
        p.write_text("\n".join([lines[0], lines[1], line2, *lines[3:]]) + "\n")
        with pytest.raises(RegionsError) as e:
            read_regions(p)
        assert f"{p}:3:" in str(e.value)
        for n in needles:
            assert n in str(e.value)

    f1 = lines[2].split(",")[0]
    refused(f"{f1},spine,10,10,{w + 5},20,x/y", "outside", f"{w}x")
    refused(f"{f1},spine,30,10,20,20,x/y", "empty box")
    refused(f"{f1},knee,10,10,20,20,x/y", "unknown label 'knee'")
    refused(f"{f1},spine,ten,10,20,20,x/y", "x0 is not a number")
    refused(f"{tmp_path}/missing.png,spine,10,10,20,20,x/y", "not found")


@needs_regions
def test_coco_and_yolo_errors_name_file_and_line(tmp_path):
    rows = real_rows(1)
    coco = write_coco(rows, tmp_path / "c.json")
    data = json.loads(coco.read_text())
    data["annotations"][1]["bbox"][2] = 10_000  # far wider than the image
    coco.write_text(json.dumps(data, indent=2))
    with pytest.raises(RegionsError) as e:
        read_regions(coco)
    text = coco.read_text().splitlines()
    line = next(i for i, t in enumerate(text, start=1) if "10000" in t)
    # The bbox key's line is reported, a few lines above the offending number.
    reported = int(str(e.value).split(":")[1])
    assert 0 < line - reported <= 4 and "annotations[1].bbox" in str(e.value) and "outside" in str(e.value)

    root = write_yolo(rows, tmp_path / "y")
    label = min((root / "labels").glob("*.txt"))
    label.write_text(label.read_text() + "5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(RegionsError, match=rf"{label}:2: class 5 is not in"):
        read_regions(root)
    label.write_text("0 0.5 0.5 0.1\n")
    with pytest.raises(RegionsError, match=rf"{label}:1: expected 'class cx cy w h'"):
        read_regions(root)
