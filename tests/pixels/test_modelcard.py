"""Model cards: a bad card or the wrong weights must be refused with a message an admin can act on."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import pytest
import yaml

from nnrouter.pixels.modelcard import (
    ModelCard,
    ModelCardError,
    load_card,
    sha256_file,
    verify,
    write_card,
)

WEIGHTS = b"not really onnx, but the digest does not care"


def card_dict(**over) -> dict:
    d = {
        "name": "nncpr",
        "task": "classify",
        "labels": ["chest_pa_ap", "chest_lateral", "pelvis_ap"],
        "input": {
            "size": [224, 224],
            "channels": 3,
            "layout": "NCHW",
            "resize": "stretch",
            "normalisation": {"mean": [128, 128, 128], "std": [128, 128, 128]},
        },
        "input_name": "input",
        "outputs": {"scores": "scores"},
        "scores_are": "logits",
        "version": "1.0.0",
        "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
        "provenance": "trained on public data",
        "licence": "Apache-2.0",
        "limitations": ["adults only"],
    }
    d.update(over)
    return d


def write(tmp_path: Path, data: dict | str, weights: bytes = WEIGHTS) -> Path:
    (tmp_path / "model.onnx").write_bytes(weights)
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    (tmp_path / "model.yaml").write_text(text)
    return tmp_path


def test_valid_card_loads_with_defaults(tmp_path):
    card = load_card(write(tmp_path, card_dict()))
    assert card.input.size == (224, 224)
    assert card.temperature == 1.0
    assert card.unknown_threshold is None
    assert (card.conf_threshold, card.iou_threshold) == (0.25, 0.45)
    assert card.input.pad_value == 114


def test_write_then_load_round_trips_in_stable_order(tmp_path):
    card = ModelCard.model_validate(card_dict(metrics={"top1": 0.93}, unknown_threshold=0.5))
    write_card(card, tmp_path)
    first = (tmp_path / "model.yaml").read_text()
    assert load_card(tmp_path) == card
    assert list(yaml.safe_load(first))[:4] == ["name", "task", "labels", "input"]
    write_card(load_card(tmp_path), tmp_path)
    assert (tmp_path / "model.yaml").read_text() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.yaml")]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["input"].update(size=[224]), "input.size"),
        (lambda d: d["input"].update(sise=[224, 224]), "input.sise"),
        (lambda d: d["input"]["normalisation"].update(mean=[128]), "input.normalisation"),
        (lambda d: d["input"]["normalisation"].update(std=[1, 0, 1]), "input.normalisation.std"),
        (lambda d: d["input"].update(channels=2), "input.channels"),
        (lambda d: d["input"].update(layout="CHW"), "input.layout"),
        (lambda d: d.update(labels=["a", "b", "a"]), "labels"),
        (lambda d: d.update(labels=[]), "labels"),
        (lambda d: d.update(labels=["a", 3]), "labels[1]"),
        (lambda d: d.update(outputs={"cam": "cam"}), "outputs"),
        (lambda d: d.update(outputs={"scores": "s", "logits": "l"}), "outputs"),
        (lambda d: d.update(sha256="abc"), "sha256"),
        (lambda d: d.update(temperature=0), "temperature"),
        (lambda d: d.update(unknown_threshold=1.5), "unknown_threshold"),
        (lambda d: d.pop("licence"), "licence"),
        (lambda d: d.pop("scores_are"), "scores_are"),
        (lambda d: d.update(task="segment"), "task"),
    ],
)
def test_bad_card_error_names_file_and_field(tmp_path, change, field):
    d = copy.deepcopy(card_dict())
    change(d)
    with pytest.raises(ModelCardError) as e:
        load_card(write(tmp_path, d))
    msg = str(e.value)
    assert re.search(rf"model\.yaml:\d+:\d+: .*{re.escape(field)}", msg), msg


def test_error_gives_the_yaml_line(tmp_path):
    d = card_dict()
    d["input"]["size"] = [224]
    text = yaml.safe_dump(d, sort_keys=False)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.strip().startswith("size:"))
    with pytest.raises(ModelCardError, match=rf"model\.yaml:{line}:\d+: input\.size: "):
        load_card(write(tmp_path, text))


def test_one_line_per_problem(tmp_path):
    d = card_dict(labels=["a", "a"], sha256="x")
    with pytest.raises(ModelCardError) as e:
        load_card(write(tmp_path, d))
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert all(s.startswith(str(tmp_path / "model.yaml")) for s in lines)


@pytest.mark.parametrize(
    ("outputs", "ok"),
    [
        ({"predictions": "output0"}, True),
        ({"boxes": "boxes", "confs": "confs"}, True),
        ({"boxes": "boxes"}, False),
        ({"predictions": "p", "boxes": "b", "confs": "c"}, False),
        ({"scores": "scores"}, False),
    ],
)
def test_detect_outputs_are_one_of_two_layouts(tmp_path, outputs, ok):
    d = card_dict(task="detect", labels=["HEAD", "SPINE", "CHEST", "ABDOMEN", "PELVIS"], outputs=outputs)
    del d["scores_are"]
    write(tmp_path, d)
    if ok:
        assert load_card(tmp_path).outputs == outputs
    else:
        with pytest.raises(ModelCardError, match=r"model.yaml:\d+:\d+: outputs: "):
            load_card(tmp_path)


def test_missing_and_unparsable_cards(tmp_path):
    with pytest.raises(ModelCardError, match=r"model\.yaml: model card not found"):
        load_card(tmp_path)
    write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ModelCardError, match=r"model.yaml:\d+:\d+: \(top level\): not valid YAML"):
        load_card(tmp_path)
    write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ModelCardError, match="mapping"):
        load_card(tmp_path)


def test_verify_returns_digest(tmp_path):
    write(tmp_path, card_dict())
    assert verify(tmp_path) == hashlib.sha256(WEIGHTS).hexdigest() == sha256_file(tmp_path / "model.onnx")


def test_verify_accepts_upper_case_digest(tmp_path):
    write(tmp_path, card_dict(sha256=hashlib.sha256(WEIGHTS).hexdigest().upper()))
    assert verify(tmp_path) == hashlib.sha256(WEIGHTS).hexdigest()


def test_verify_refuses_other_weights(tmp_path):
    write(tmp_path, card_dict(), weights=b"retrained weights")
    actual = hashlib.sha256(b"retrained weights").hexdigest()
    expected = hashlib.sha256(WEIGHTS).hexdigest()
    with pytest.raises(ModelCardError) as e:
        verify(tmp_path)
    assert f"model.onnx sha256 is {actual}, card says {expected}: refusing to load" in str(e.value)


def test_verify_missing_weights(tmp_path):
    write(tmp_path, card_dict())
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelCardError, match=r"model\.onnx: model file not found"):
        verify(tmp_path)


def test_sha256_file_streams_large_files(tmp_path):
    data = bytes(range(256)) * 20000  # > one 1 MiB chunk
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
