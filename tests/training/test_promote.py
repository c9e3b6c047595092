"""`nnrouter models promote`: a retrained model replaces the configured one only when it is at least as good.

The models are real: EfficientNet-Lite0 fine-tuned for two epochs at 64 px on
two classes of the shared radiographs, once on the true labels and once on
shuffled ones (the worse model). Held-out sources are the second source of
each class, which neither model saw.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import RADIOGRAPHS, REPO, needs
from sqlalchemy import select

from nnrouter.cli import main
from nnrouter.core.store import (
    Instance,
    InstanceState,
    Prediction,
    Series,
    Store,
    Study,
)
from nnrouter.pixels.modelcard import (
    InputSpec,
    ModelCard,
    Normalisation,
    load_card,
    sha256_file,
    verify,
    write_card,
)
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, write_dx
from nnrouter.training import dataset, promote

RULES = REPO / "rules" / "labels.yaml"
# class -> (source trained on, source held out)
SOURCES = {
    "chest_pa_ap": ("rishabhbhardwaj/ChestXRay-Classification", "ml-workgroup/covid-19-image-repository"),
    "panoramic_radiograph": ("devichand579/Instance_seg_teeth", "Zzz512/MLUA"),
}
HELD_OUT = sorted(held for _, held in SOURCES.values())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "label", "group", "kind"])
        w.writerows((file, label, group, "image") for file, label, group in rows)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(train.csv, all.csv, good model, worse model): all.csv is train.csv plus the held-out sources."""
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    pytest.importorskip("torch", reason="the [train] extra is not installed (make test installs it)")
    from nnrouter.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("promote")
    listed = _rows(RADIOGRAPHS / "MANIFEST.csv")
    fit, held = [], []
    for label, (source, other) in SOURCES.items():
        fit += [
            (str(RADIOGRAPHS / r["file"]), label, source) for r in listed if r["class"] == label and r["repo"] == source
        ][:20]
        held += [
            (str(RADIOGRAPHS / r["file"]), label, other) for r in listed if r["class"] == label and r["repo"] == other
        ][:12]
    train_csv = _write(root / "train.csv", fit)
    all_csv = _write(root / "all.csv", fit + held)
    labels = [label for _, label, _ in fit]
    random.Random(0).shuffle(labels)
    shuffled = _write(root / "shuffled.csv", [(f, label, g) for (f, _, g), label in zip(fit, labels)])
    cfg = TrainConfig(size=64, epochs=2, per_class=16, batch_size=16, val_percent=30, min_images=10, views=2)

    def quiet(_msg: str) -> None:
        pass

    good = train(train_csv, root / "good", cfg, name="tiny-good", command="test", log=quiet).out
    worse = train(shuffled, root / "worse", cfg, name="tiny-shuffled", command="test", log=quiet).out
    return train_csv, all_csv, good, worse


def _install_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.mark.slow
def test_a_worse_model_is_refused_with_the_comparison(trained, tmp_path, capsys):
    _, all_csv, good, worse = trained
    target = _install_copy(good, tmp_path / "models" / "view")
    rc = main(["models", "promote", "--candidate", str(worse), "--dataset", str(all_csv), "--current", str(target)])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "held out: the validation split both cards record" in out
    for text in (
        "accuracy",
        "reported unknown",
        "sensitivity per class:",
        "chest_pa_ap",
        "panoramic_radiograph",
        "candidate tiny-shuffled",
        "current   tiny-good",
    ):
        assert text in out
    assert "not promoted: accuracy" in err
    assert verify(target) == load_card(good).sha256  # untouched
    assert not promote.previous_dir(target).exists()

    comparison = promote.compare(worse, target, all_csv, log=lambda _m: None)
    assert comparison.candidate.images == comparison.current.images >= 8  # the same images for both
    assert comparison.candidate.correct < comparison.current.correct
    assert comparison.current.accuracy >= 0.8  # the good model is good, so the refusal means something
    # A tolerance does not excuse lower accuracy.
    assert not promote.compare(worse, target, all_csv, tolerance=1.0, log=lambda _m: None).accepted


@pytest.mark.slow
def test_a_better_model_on_held_out_sources_is_promoted_and_rolled_back(trained, tmp_path, capsys):
    train_csv, all_csv, good, worse = trained
    target = _install_copy(worse, tmp_path / "models" / "view")
    config = tmp_path / "nnrouter.yaml"
    config.write_text(yaml.safe_dump({"models": {"classifier": str(target)}}))
    good_sha, worse_sha = load_card(good).sha256, load_card(worse).sha256

    # A card that lists no training groups (one written before train() recorded them), whose digest is not this
    # dataset without the held-out sources (shuffled labels), cannot show it was kept off them: refused first.
    def without_groups(model: Path, name: str) -> Path:
        legacy = _install_copy(model, tmp_path / name)
        card = load_card(legacy)
        training = {k: v for k, v in card.metrics["training"].items() if k not in ("groups", "manifest_digest")}
        write_card(card.model_copy(update={"metrics": {**card.metrics, "training": training}}), legacy)
        return legacy

    legacy = without_groups(worse, "legacy")
    legacy_good = without_groups(good, "legacy-good")  # proof by manifest digest only (from its provenance)
    rc = main(
        [
            "models",
            "promote",
            "--config",
            str(config),
            "--candidate",
            str(legacy),
            "--dataset",
            str(all_csv),
            "--holdout-groups",
            ",".join(HELD_OUT),
        ]
    )
    assert rc == 2 and "does not show that it was kept off" in capsys.readouterr().err
    # The groups train() records are that proof: the same candidate with them gets past this check.
    assert promote.trained_groups(load_card(worse)) and not promote.trained_groups(load_card(worse)) & set(HELD_OUT)
    rc = main(
        [
            "models",
            "promote",
            "--config",
            str(config),
            "--candidate",
            str(good),
            "--dataset",
            str(train_csv),
            "--holdout-groups",
            SOURCES["chest_pa_ap"][0],
        ]
    )
    assert rc == 2 and "card says it was trained on" in capsys.readouterr().err  # by its recorded groups
    rc = main(
        [
            "models",
            "promote",
            "--config",
            str(config),
            "--candidate",
            str(legacy_good),
            "--dataset",
            str(train_csv),
            "--holdout-groups",
            SOURCES["chest_pa_ap"][0],
        ]
    )
    assert rc == 2 and "trained on this whole dataset" in capsys.readouterr().err  # by its manifest digest
    rc = main(
        [
            "models",
            "promote",
            "--config",
            str(config),
            "--candidate",
            str(good),
            "--dataset",
            str(all_csv),
            "--holdout-groups",
            "no/such-source",
        ]
    )
    assert rc == 2 and "no image of the dataset is in group" in capsys.readouterr().err

    # Images that arrived after training: the dataset is no longer the training manifest plus the held-out
    # groups, so the proof must come from the training manifest itself.
    grown = _write(
        tmp_path / "grown.csv",
        [(r["file"], r["label"], r["group"]) for r in _rows(all_csv)]
        + [
            (str(RADIOGRAPHS / r["file"]), "chest_pa_ap", r["repo"])
            for r in _rows(RADIOGRAPHS / "MANIFEST.csv")
            if r["repo"] == SOURCES["chest_pa_ap"][0]
        ][40:45],
    )
    args = [
        "models",
        "promote",
        "--config",
        str(config),
        "--candidate",
        str(legacy_good),
        "--dataset",
        str(grown),
        "--holdout-groups",
        ",".join(HELD_OUT),
        "--dry-run",
    ]
    assert main(args) == 2 and "Give its training manifest" in capsys.readouterr().err
    assert main([*args, "--trained-on", str(tmp_path.parent / "x.csv")]) == 2
    capsys.readouterr()
    assert main([*args, "--trained-on", str(all_csv)]) == 2
    assert "is not the manifest the candidate was trained on" in capsys.readouterr().err
    assert main([*args, "--trained-on", str(train_csv)]) == 0
    assert "dry run" in capsys.readouterr().out and verify(target) == worse_sha

    rc = main(
        [
            "models",
            "promote",
            "--config",
            str(config),
            "--candidate",
            str(good),
            "--dataset",
            str(all_csv),
            "--holdout-groups",
            ",".join(HELD_OUT),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert f"held out: source groups {', '.join(HELD_OUT)}" in out and "24 images" in out
    assert "promoted:" in out
    assert verify(target) == good_sha and load_card(target).name == "tiny-good"
    assert verify(promote.previous_dir(target)) == worse_sha
    assert not list(target.parent.glob(".view.incoming-*"))

    # Equal is good enough: the same model again (a dry run leaves everything as it is).
    rc = main(
        ["models", "promote", "--config", str(config), "--candidate", str(good), "--dataset", str(all_csv), "--dry-run"]
    )
    out, _ = capsys.readouterr()
    assert rc == 0 and "+0.000" in out and "dry run" in out
    assert verify(promote.previous_dir(target)) == worse_sha

    assert main(["models", "promote", "--config", str(config), "--rollback"]) == 0
    assert verify(target) == worse_sha and verify(promote.previous_dir(target)) == good_sha
    assert main(["models", "promote", "--config", str(config), "--rollback"]) == 0  # and back again
    assert verify(target) == good_sha


@pytest.mark.slow
def test_nothing_held_out_is_refused(trained, tmp_path, capsys):
    _, _, good, worse = trained
    listed = _rows(RADIOGRAPHS / "MANIFEST.csv")
    knees = _write(
        tmp_path / "knees.csv",
        [(str(RADIOGRAPHS / r["file"]), "knee_ap", r["repo"]) for r in listed if r["class"] == "knee_ap"][:10],
    )
    target = _install_copy(worse, tmp_path / "view")
    rc = main(["models", "promote", "--current", str(target), "--candidate", str(good), "--dataset", str(knees)])
    assert rc == 2 and "nothing held out" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_picks_up_the_promoted_model_between_batches(trained, tmp_path):
    from nnrouter.core import config as config_mod
    from nnrouter.pixels.classify import Worker
    from nnrouter.pixels.runtime import Model

    _, _, good, worse = trained
    target = _install_copy(worse, tmp_path / "models" / "view")
    db = tmp_path / "nnrouter.db"
    cfg = tmp_path / "nnrouter.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{db}"},
                "models": {"classifier": str(target)},
                "storage": {"path": str(tmp_path / "spool"), "derived_path": str(tmp_path / "derived")},
                "workers": {"max_wait_ms": 0},
            }
        )
    )
    settings = config_mod.load(cfg)
    store = Store(settings.database.url)
    store.upgrade()

    def receive(n: int, start: int) -> None:
        with store.write() as s:
            study = Study(study_uid=f"1.2.{start}")
            series = Series(study=study, series_uid=f"1.2.{start}.1")
            s.add_all([study, series])
            for i in range(start, start + n):
                path = write_dx(tmp_path / f"dx{i}.dcm", DXSpec(rows=64, columns=64, seed=i))
                s.add(
                    Instance(
                        series=series,
                        sop_instance_uid=f"1.3.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=str(path),
                        size_bytes=1,
                        sha256=sha256_file(path),
                        state=InstanceState.RECEIVED,
                    )
                )

    def models_used() -> list[str]:
        with store.read() as s:
            return [p.model_name for p in s.execute(select(Prediction).order_by(Prediction.id)).scalars()]

    try:
        worker = Worker(settings, store, Model.load(target))
        receive(3, 0)
        worker.run(until_empty=True)
        assert models_used() == ["tiny-shuffled"] * 3
        assert worker.pick_up_promoted() is False  # nothing changed: one stat, no load

        promote.install(good, target, log=lambda _m: None)
        receive(2, 10)
        worker.run(until_empty=True)
        assert models_used() == ["tiny-shuffled"] * 3 + ["tiny-good"] * 2
        assert worker.classifier.sha256 == load_card(good).sha256
    finally:
        store.dispose()


# --- the swap itself (no model needed) ---------------------------------------------------


def _fake_model(folder: Path, name: str, size: int) -> Path:
    """A folder whose card pins its model.onnx bytes: enough for verify(), which is what the swap checks."""
    folder.mkdir(parents=True)
    blob = hashlib.sha256(name.encode()).digest() * (size // 32)
    (folder / "model.onnx").write_bytes(blob)
    card = ModelCard(
        name=name,
        task="classify",
        labels=["a", "b"],
        input_name="input",
        outputs={"scores": "s"},
        input=InputSpec(
            size=(8, 8), channels=1, layout="NCHW", resize="stretch", normalisation=Normalisation(mean=[0.0], std=[1.0])
        ),
        scores_are="logits",
        version="1",
        sha256=hashlib.sha256(blob).hexdigest(),
        provenance="test",
        licence="test",
    )
    write_card(card, folder)
    return folder


# What a loading worker does, in a process of its own (a thread would only run between our renames when
# the GIL lets it): open the folder once, read the card and the weights from it, and check they belong together.
_READER = """
import hashlib, json, os, sys
target, stop = sys.argv[1], sys.argv[2]
reads, bad, names = 0, [], set()
while not os.path.exists(stop):
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        bad.append("the folder was missing")
        continue
    try:
        with open(os.open("model.yaml", os.O_RDONLY, dir_fd=fd), "rb") as f:
            card = dict(line.split(": ", 1) for line in f.read().decode().splitlines() if line[:1].isalpha() and ": " in line)
        with open(os.open("model.onnx", os.O_RDONLY, dir_fd=fd), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != card["sha256"]:
            bad.append(card["name"] + " card with other weights")
        names.add(card["name"])
        reads += 1
    except FileNotFoundError as exc:
        bad.append(f"missing {exc.filename}")
    finally:
        os.close(fd)
print(json.dumps({"reads": reads, "bad": bad[:5], "names": sorted(names)}))
"""


def test_the_swap_is_atomic_for_a_reader_and_rollback_restores(tmp_path):
    a = _fake_model(tmp_path / "a", "model-a", 1 << 14)
    b = _fake_model(tmp_path / "b", "model-b", 1 << 13)
    target = tmp_path / "models" / "view"
    shutil.copytree(a, target)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(target), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(12):
            promote.install(b, target, log=lambda _m: None)
            promote.install(a, target, log=lambda _m: None)
            promote.rollback(target, log=lambda _m: None)
            assert load_card(target).name == "model-b" and load_card(promote.previous_dir(target)).name == "model-a"
            promote.rollback(target, log=lambda _m: None)
            assert load_card(target).name == "model-a" and load_card(promote.previous_dir(target)).name == "model-b"
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["bad"] == [] and seen["reads"] > 50 and seen["names"] == ["model-a", "model-b"], seen
    assert sorted(p.name for p in target.parent.iterdir()) == ["view", "view.previous"]


def test_a_candidate_that_does_not_verify_is_never_swapped_in(tmp_path):
    a = _fake_model(tmp_path / "a", "model-a", 4096)
    b = _fake_model(tmp_path / "b", "model-b", 4096)
    (b / "model.onnx").write_bytes(b"other weights")
    target = shutil.copytree(a, tmp_path / "models" / "view")
    with pytest.raises(promote.PromotionError, match="refusing to load"):
        promote.install(b, target, log=lambda _m: None)
    assert load_card(target).name == "model-a" and not promote.previous_dir(target).exists()
    with pytest.raises(promote.PromotionError, match="nothing to roll back to"):
        promote.rollback(target, log=lambda _m: None)
    assert sorted(p.name for p in target.parent.iterdir()) == ["view"]


# --- source groups from the sender -------------------------------------------------------


@pytest.mark.slow
@needs("storescu")
def test_store_groups_come_from_the_calling_ae_and_carry_no_patient(node_factory, tmp_path):
    node = node_factory().start()
    sent = {}
    for ae, part, institution, station in (
        ("MOD_EAST", "KNEE", "Site East", "PID12345"),
        ("MOD_WEST", "CHEST", "Site West", "DR2"),
    ):
        files = []
        for i in range(2):
            spec = DXSpec(
                rows=64,
                columns=64,
                body_part=part,
                view_position="AP" if part == "KNEE" else "PA",
                study_description=f"XR {part}",
                patient_name="DOE^JANE",
                patient_id="PID12345",
                seed=i,
            )
            path = write_dx(tmp_path / f"{ae}-{i}.dcm", spec)
            ds = pydicom.dcmread(path)
            ds.InstitutionName, ds.StationName = institution, station
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        result = peers.storescu(node.port, files, aet=ae)
        assert result.returncode == 0, result.stderr
        sent[ae] = files

    out = tmp_path / "m.csv"
    summary = dataset.build(out, store_config=node.config_path, mapping=RULES, group_by="calling_ae")
    assert summary.groups == {"AE MOD_EAST": 2, "AE MOD_WEST": 2}
    rows = _rows(out)
    assert {(r["label"], r["group"]) for r in rows} == {("knee_ap", "AE MOD_EAST"), ("chest_pa_ap", "AE MOD_WEST")}
    text = out.read_text() + dataset.summary_path(out).read_text()
    assert "DOE" not in text and "JANE" not in text and "PID12345" not in text

    by_institution = dataset.build(
        tmp_path / "i.csv", store_config=node.config_path, mapping=RULES, group_by="institution"
    )
    assert by_institution.groups == {"institution Site East": 2, "institution Site West": 2}
    # A modality that writes the patient ID into Station Name: the group is withheld, not written.
    by_station = dataset.build(tmp_path / "s.csv", store_config=node.config_path, mapping=RULES, group_by="station")
    assert by_station.groups == {"station (withheld: names the patient)": 2, "station DR2": 2}
    assert "PID12345" not in (tmp_path / "s.csv").read_text()

    # A training manifest that holds one sender out, through the command line.
    held = node.cli(
        "dataset",
        "build",
        "--store",
        "--out",
        str(tmp_path / "train.csv"),
        "--mapping",
        str(RULES),
        "--group-by",
        "calling_ae",
        "--exclude-groups",
        "AE MOD_WEST",
    )
    assert "held out of this manifest" in held.stdout
    assert {r["group"] for r in _rows(tmp_path / "train.csv")} == {"AE MOD_EAST"}
    with pytest.raises(ValueError, match="no file is in group"):
        dataset.build(tmp_path / "x.csv", store_config=node.config_path, mapping=RULES, exclude_groups=["AE MOD_NORTH"])
    store = Store(node.db_url)
    try:
        with store.read() as s:
            assert set(s.execute(select(Instance.calling_ae)).scalars()) == {"MOD_EAST", "MOD_WEST"}
    finally:
        store.dispose()


# --- which images are held out (cards only) -----------------------------------------------


def _card(folder: Path, **training) -> ModelCard:
    card = load_card(_fake_model(folder, folder.name, 64))
    return card.model_copy(update={"metrics": {"training": training}, "labels": ["chest_pa_ap", "knee_ap"]})


def test_held_out_images_are_the_ones_neither_card_trained_on(tmp_path):
    from nnrouter.training.train import Entry, is_validation

    entries = [
        Entry(f"/data/{g}/{i}.png", label, g)
        for g in ("A", "B")
        for label in ("chest_pa_ap", "knee_ap")
        for i in range(40)
    ] + [Entry("/data/B/x.png", "hand_ap", "B")]
    a = _card(tmp_path / "a", config={"val_percent": 30, "seed": 0}, groups={"A": 80})
    b = _card(tmp_path / "b", config={"val_percent": 50, "seed": 1})
    held = promote.held_out(entries, a, b)
    both = [e for e in entries if e.label != "hand_ap" and is_validation(e, 30, 0) and is_validation(e, 50, 1)]
    assert held.entries == both and 0 < len(both) < len([e for e in entries if is_validation(e, 30, 0)])
    # A card that lists the groups it trained on: the others may be held out, its own may not.
    assert [e.group for e in promote.held_out(entries, a, b, ["B"]).entries] == ["B"] * 80
    assert promote.held_out(entries, a, b, ["B"]).not_compared == 1  # hand_ap: neither model claims it
    with pytest.raises(promote.PromotionError, match="says it was trained on 'A'"):
        promote.held_out(entries, a, b, ["A"])
    with pytest.raises(promote.PromotionError, match="records no validation split"):
        promote.held_out(entries, _card(tmp_path / "c"), b)
    with pytest.raises(promote.PromotionError, match="nothing held out"):
        promote.held_out([Entry("/data/B/x.png", "hand_ap", "B")], a, b, ["B"])
