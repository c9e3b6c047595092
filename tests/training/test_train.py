"""Training, export and evaluation on a small real subset; the shipped model's promises."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import RADIOGRAPHS, REPO, SHARED, needs_shared

torch = pytest.importorskip("torch", reason="the [train] extra is not installed (make test installs it)")

from nnrouter.pixels.modelcard import load_card, verify  # noqa: E402
from nnrouter.pixels.runtime import Model  # noqa: E402
from nnrouter.training.evaluate import evaluate, metrics_from_confusion  # noqa: E402
from nnrouter.training.train import (  # noqa: E402
    TrainConfig,
    augment,
    build_network,
    fit_mahalanobis,
    is_validation,
    load_gray,
    read_manifest,
    to_tensor_batch,
    torch_outputs,
    train,
)

SHIPPED = REPO / "models" / "nnrouter-view"


def _subset_manifest(path: Path, classes: list[str], per_class: int) -> Path:
    rows = list(csv.DictReader(open(RADIOGRAPHS / "MANIFEST.csv")))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "group", "kind"])
        for c in classes:
            for r in [r for r in rows if r["class"] == c][:per_class]:
                w.writerow([str(RADIOGRAPHS / r["file"]), c, r["repo"], "image"])
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    root = tmp_path_factory.mktemp("train")
    manifest = _subset_manifest(root / "m.csv", ["chest_pa_ap", "knee_ap", "panoramic_radiograph", "shoulder_ap"], 40)
    cfg = TrainConfig(size=128, epochs=2, per_class=24, batch_size=16, val_percent=25, patience=5)
    result = train(manifest, root / "model", cfg, name="tiny", command="test")
    return manifest, result, cfg


@pytest.mark.slow
def test_short_training_beats_chance_on_held_out_images(small_model):
    manifest, result, cfg = small_model
    entries = read_manifest(manifest)
    held = [e for e in entries if is_validation(e, cfg.val_percent, cfg.seed)]
    assert 10 <= len(held) < len(entries) / 2
    chance = 1 / len(result.labels)
    model = Model.load(result.out)
    hits = [r.top[0][0] == e.label for e, r in zip(held, model.classify([load_gray(e) for e in held]))]
    accuracy = float(np.mean(hits))
    assert accuracy >= chance + 0.4, f"held-out accuracy {accuracy:.2f} vs chance {chance:.2f}"
    card = load_card(result.out)
    assert card.labels == sorted(card.labels) and card.temperature > 0
    assert card.ood_threshold and card.unknown_threshold is not None
    assert "abdomen_ap" in card.not_covered and "knee_ap" not in card.not_covered
    assert len(card.not_covered) == 31 - 4  # the 30 NNCPR classes and whole_spine_ap, less the 4 trained


@pytest.mark.slow
def test_onnx_export_equals_torch(small_model, tmp_path):
    manifest, result, cfg = small_model
    entries = read_manifest(manifest)[:6]
    x = to_tensor_batch([load_gray(e) for e in entries], cfg.size)
    net = build_network(len(result.labels), 0)
    net.eval()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 1280)).astype(np.float32)
    means, whiten = fit_mahalanobis(feats, rng.integers(0, len(result.labels), 40), len(result.labels))
    from nnrouter.training.train import export_onnx

    export_onnx(net, means, whiten, tmp_path / "model.onnx", cfg.size)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits", "cam", "ood"], {"input": x})
    want = torch_outputs(net, means, whiten, x)
    for name, g, w in zip(["logits", "cam", "ood"], got, want):
        assert g.shape == w.shape, name
        assert np.max(np.abs(g - w)) <= 1e-4 * max(1.0, float(np.max(np.abs(w)))), name


@pytest.mark.slow
def test_evaluate_numbers_come_from_its_own_confusion_matrix(small_model, tmp_path):
    manifest, result, _ = small_model
    report = evaluate(result.out, manifest, split="all", out=tmp_path / "eval")
    confusion = np.array(report.confusion)
    assert confusion.sum() == report.images == len(read_manifest(manifest))
    accuracy, per_class = metrics_from_confusion(confusion, report.labels)
    assert report.accuracy == round(accuracy, 4) and report.per_class == per_class
    for k, label in enumerate(report.labels):
        n = confusion[k].sum()
        assert per_class[label]["sensitivity"] == round(confusion[k, k] / n, 4)
    assert 0 <= report.ece <= 1
    assert report.leave_one_source_out["measurable"] is False  # not asked for (--loso)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_fold_decisions_are_the_exported_models_decisions(tmp_path):
    """Leave-one-source-out decides from the feature bank; the runtime from the ONNX file. They must agree."""
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    from nnrouter.training.train import build_bank, export_onnx, fit

    manifest = _subset_manifest(tmp_path / "m.csv", ["chest_pa_ap", "knee_ap", "whole_spine_ap"], 16)
    entries = read_manifest(manifest)
    cfg = TrainConfig(size=96, epochs=1, per_class=8, batch_size=8, views=2, min_images=10, val_percent=25)
    labels = sorted({e.label for e in entries})
    bank = build_bank(entries, list(range(len(entries))), cfg, log=lambda m: None)
    fitted = fit(bank, entries, labels, list(range(len(entries))), cfg, log=lambda m: None)
    export_onnx(fitted.net, fitted.ood["means"], fitted.ood["whiten"], tmp_path / "model.onnx", cfg.size)
    decided = fitted.decide(bank, list(range(len(entries))), cfg)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, _, ood = sess.run(
        ["logits", "cam", "ood"], {"input": to_tensor_batch([load_gray(e) for e in entries], cfg.size)}
    )
    from nnrouter.training.train import softmax

    probs = softmax(logits / fitted.temperature)
    for d, p, o in zip(decided, probs, ood):
        assert d["top"] == labels[int(p.argmax())]
        assert abs(d["score"] - float(p.max())) < 0.02 and abs(d["ood"] - float(o)) < 0.02 * max(1.0, float(o))


def test_augmentation_keeps_the_original_and_never_flips():
    img = np.zeros((120, 100), np.uint8)
    img[:, :30] = 200  # bright on the left only
    before = img.copy()
    rng = random.Random(3)
    for _ in range(50):
        out = augment(img, rng)
        assert out.dtype == np.uint8 and out.ndim == 2
    assert np.array_equal(img, before), "augment changed the cached original"


# --- the shipped default classifier ------------------------------------------


def test_shipped_model_card_and_weights_agree():
    assert SHIPPED.is_dir(), "models/nnrouter-view is the shipped default classifier"
    card = load_card(SHIPPED)
    assert verify(SHIPPED) == card.sha256
    assert (SHIPPED / "model.onnx").stat().st_size <= 25 * 1024 * 1024
    assert card.ood_threshold and card.unknown_threshold
    assert set(card.labels) | set(card.not_covered) >= {"chest_pa_ap", "knee_lateral", "wrist_ap"}
    assert not set(card.labels) & set(card.not_covered)
    # Too few images to claim: never predicted, and the card says why.
    assert {"pelvis_ap", "hand_oblique"} <= set(card.not_covered) and "other" not in card.labels
    assert set(card.metrics["training"]["not_trained"]) == {"pelvis_ap", "other", "hand_oblique"}
    assert "whole_spine_ap" in card.labels
    # Reproducible: the command, the data digest, the versions, the time and the machine.
    for needle in ("nnrouter train classifier", "manifest digest", "torch ", "onnxruntime ", "trained in ", "CPUs"):
        assert needle in card.provenance
    # The figures that generalise are in the card, with the targets said met or missed, and the ablation.
    loso = card.metrics["leave_one_source_out"]
    assert loso["measurable"] and set(loso["classes"]) == {
        "chest_pa_ap",
        "chest_lateral",
        "panoramic_radiograph",
        "abdomen_ap",
    }
    assert {f["held_out"] for f in loso["folds"]} == {s for ss in loso["classes"].values() for s in ss}
    assert set(loso["targets"]) == {"chest_pa_ap", "chest_lateral", "panoramic_radiograph", "abdomen_ap"}
    missed = [f"{c} on {s}" for c, per in loso["targets"].items() for s, v in per.items() if v == "missed"]
    assert all(m.split(" on ")[0] in " ".join(card.limitations) for m in missed)
    assert set(card.metrics["augmentation_ablation"]["mean_sensitivity_with_and_without"]) == set(loso["classes"])


# The acceptance of the shipped model on real DICOM from other sources: chests
# are chests; unseen anatomy is not claimed. Some files are known misses of the
# current model (see its card, metrics.external); strict xfail turns green into
# a failure when a retrained model gets them right, so the list stays true.
ACCEPT = [
    ("cr_chest_mono1_no_meta.dcm", {"chest_pa_ap"}),
    ("nema_RG1_J2KI.dcm", {"chest_pa_ap"}),
    ("nema_RG1_JLSN.dcm", {"chest_pa_ap"}),
    ("cr_wrist_pa_philips.dcm", {"wrist_ap"}),  # a Philips CR wrist: another source than the training wrists
    ("nema_RG2_J2KR.dcm", {"unknown", "other"}),  # hip
    ("nema_RG3_J2KR.dcm", {"unknown", "other"}),  # lower leg
    ("nema_MG1_J2KI.dcm", {"unknown", "other"}),  # mammogram
    pytest.param(
        "dx_chest_j2k_no_bodypart.dcm",
        {"chest_pa_ap"},
        marks=pytest.mark.xfail(
            strict=True, reason="known miss: top class chest_pa_ap at 0.71, below the 0.90 score threshold for unknown"
        ),
    ),
    pytest.param(
        "vet_dx_jpeg_baseline_ybr.dcm",
        {"unknown", "other"},
        marks=pytest.mark.xfail(
            strict=True,
            reason="known miss: a dog's limb is called shoulder_ap 0.99 (every training shoulder has a long metal stem)",
        ),
    ),
    pytest.param(
        "cr_wrist_lateral_philips.dcm",
        {"unknown", "other"},
        marks=pytest.mark.xfail(
            strict=True,
            reason="known miss: a lateral wrist (never trained) is called wrist_ap 0.99, within the feature distance",
        ),
    ),
]


@needs_shared
@pytest.mark.parametrize(("name", "allowed"), ACCEPT)
def test_shipped_model_on_real_dicom_from_other_sources(name, allowed):
    from nnrouter.pixels.decode import decode_file

    model = Model.load(SHIPPED)
    (r,) = model.classify([decode_file(SHARED / "data" / "dicom" / "good" / name, max_side=1024).image])
    assert r.label in allowed, (r.label, round(r.score, 3), round(r.ood or 0, 1), r.top[:2])
