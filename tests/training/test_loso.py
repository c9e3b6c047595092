"""Leave-one-source-out on a small real subset: it trains without the source and reports what it claims."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from conftest import RADIOGRAPHS

pytest.importorskip("torch", reason="the [train] extra is not installed (make test installs it)")

from nnrouter.training.loso import Prediction, leave_one_source_out, summarise
from nnrouter.training.train import TrainConfig, read_manifest

# Two classes with two real sources each, and one single-source class.
PICK = {
    ("chest_pa_ap", "rishabhbhardwaj/ChestXRay-Classification"): 14,
    ("chest_pa_ap", "ml-workgroup/covid-19-image-repository"): 14,
    ("panoramic_radiograph", "devichand579/Instance_seg_teeth"): 14,
    ("panoramic_radiograph", "Zzz512/MLUA"): 14,
    ("knee_ap", "Rohan-145/KneeOA_Analysis"): 20,
}


@pytest.fixture(scope="module")
def loso(tmp_path_factory):
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    root = tmp_path_factory.mktemp("loso")
    rows = list(csv.DictReader(open(RADIOGRAPHS / "MANIFEST.csv")))
    manifest = root / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "group", "kind"])
        for (label, repo), n in PICK.items():
            for r in [r for r in rows if r["class"] == label and r["repo"] == repo][:n]:
                w.writerow([str(RADIOGRAPHS / r["file"]), label, repo, "image"])
    cfg = TrainConfig(
        size=96, epochs=2, per_class=12, batch_size=12, views=2, min_images=10, val_percent=20, patience=5
    )
    return manifest, leave_one_source_out(manifest, cfg, cache_dir=root / "cache", log=lambda m: None)


@pytest.mark.slow
def test_each_fold_trains_without_its_source_and_tests_on_all_of_it(loso):
    manifest, result = loso
    entries = read_manifest(manifest)
    assert result["measurable"]
    assert set(result["classes"]) == {"chest_pa_ap", "panoramic_radiograph"}  # knee_ap has one source
    held = [f["held_out"] for f in result["folds"]]
    assert sorted(held) == sorted(s for label, s in PICK if label != "knee_ap")
    for fold in result["folds"]:
        source = fold["held_out"]
        mine = [e for e in entries if e.group == source]
        assert fold["test_images"] == len(mine)
        # What the fold trained on is everything else: no image of its source.
        others = Counter(e.label for e in entries if e.group != source)
        assert fold["trained_images"] == dict(sorted(others.items()))
        tested = [p for p in result["predictions"] if p["source"] == source]
        assert sorted(p["file"] for p in tested) == sorted(Path(e.file).name for e in mine)


@pytest.mark.slow
def test_a_figure_recomputed_by_hand(loso):
    _, result = loso
    source = "Zzz512/MLUA"
    preds = [p for p in result["predictions"] if p["source"] == source]
    truth = [p for p in preds if p["truth"] == "panoramic_radiograph"]
    hits = sum(p["label"] == "panoramic_radiograph" for p in truth)
    row = result["table"]["panoramic_radiograph"][source]
    assert row["n"] == len(truth) == PICK[("panoramic_radiograph", source)]
    assert row["sensitivity"] == round(hits / len(truth), 4)
    misses = Counter(p["label"] for p in truth if p["label"] != "panoramic_radiograph")
    assert row["missed_as"] == dict(misses)


def test_summary_counts_unknown_as_a_miss_and_precision_within_the_source():
    def p(source, truth, label):  # type: ignore[no-untyped-def]
        return Prediction("f", source, truth, label, truth, 0.9, 1.0)

    preds = [
        p("A", "chest", "chest"),
        p("A", "chest", "unknown"),
        p("A", "chest", "chest"),
        p("A", "knee", "chest"),
        p("B", "chest", "chest"),
    ]
    table = summarise(preds, {"chest": ["A", "B"]})
    assert table["chest"]["A"] == {
        "n": 3,
        "sensitivity": round(2 / 3, 4),
        "top_class_sensitivity": 1.0,
        "precision": round(2 / 3, 4),
        "missed_as": {"unknown": 1},
    }
    # B holds only chest films: precision within it would be 1.0 whatever the model did, so it is not given.
    assert table["chest"]["B"] == {
        "n": 1,
        "sensitivity": 1.0,
        "top_class_sensitivity": 1.0,
        "precision": None,
        "missed_as": {},
    }


def test_a_fold_refills_the_class_cap_from_the_other_sources():
    from nnrouter.training.loso import fold_subset
    from nnrouter.training.train import Entry, training_subset

    entries = [Entry(f"/d/{g}_{i}.png", "chest_pa_ap", g) for g in ("A", "B") for i in range(30)]
    entries += [Entry(f"/d/k_{i}.png", "knee_ap", "K") for i in range(30)]
    cfg = TrainConfig(max_per_class=20)
    keep = training_subset(entries, ["chest_pa_ap", "knee_ap"], cfg.max_per_class, cfg.seed)
    fold = fold_subset(entries, ["chest_pa_ap", "knee_ap"], keep, "A", cfg)
    assert not any(entries[i].group == "A" for i in fold)
    # Without A, chest still gets its 20 (all from B), not only the B images the full-data cap happened to pick.
    assert Counter(entries[i].label for i in fold) == {"chest_pa_ap": 20, "knee_ap": 20}
    assert sum(entries[i].group == "B" for i in keep) < 20
