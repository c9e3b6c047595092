"""Hand-edited YAML: a key given twice is an error naming the file and both lines, in every file nnrouter reads.

PyYAML keeps the last of two equal keys without a word; an admin who pasted a
second ``destinations:`` block would run with half the file. Each test below
writes a file that PyYAML alone would load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from nnrouter.cli import main
from nnrouter.core import yamlfile

ROOT = Path(__file__).resolve().parents[2]


def _problems(path: Path) -> list[str]:
    with pytest.raises(yamlfile.FileProblems) as err:
        yamlfile.load(path)
    return [str(p) for p in err.value.problems]


def test_duplicate_top_level_key_names_file_and_both_lines(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("destinations: []\nrules: []\ndestinations:\n  - name: pacs\n")
    assert yaml.safe_load(path.read_text()) == {"destinations": [{"name": "pacs"}], "rules": []}  # what PyYAML does
    assert _problems(path) == [f"{path}:3:1: destinations: duplicate key 'destinations' (first at line 1)"]


def test_every_duplicate_at_any_depth_in_file_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "settings:\n"  # 1
        "  quiet_s: 10\n"  # 2
        "  quiet_s: 20\n"  # 3
        "rules:\n"  # 4
        "  - name: a\n"  # 5
        "    then: {forward: pacs, forward: ai}\n"  # 6
        "  - name: b\n"  # 7
        "    name: c\n"  # 8
    )
    problems = _problems(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:3:3", f"{path}:6:27", f"{path}:8:5"]
    assert "settings.quiet_s: duplicate key 'quiet_s' (first at line 2)" in problems[0]
    assert "rules[0].then.forward: duplicate key 'forward' (first at line 6)" in problems[1]
    assert "rules[1].name: duplicate key 'name' (first at line 7)" in problems[2]


def test_keys_compare_as_yaml_reads_them(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("keep_days_by_destination:\n  1: 3\n  0x1: 4\n  '1': 5\n")
    # 1 and 0x1 are the same integer; '1' is a string, another key.
    assert [p.split(": ", 1)[1] for p in _problems(path)] == [
        "keep_days_by_destination.0x1: duplicate key '0x1' (first at line 2)"
    ]


def test_merge_keys_may_still_be_overridden(tmp_path):
    """``<<: *base`` then a key of base is what merges are for, not a duplicate."""
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {port: 104, host: pacs}\ncopy:\n  <<: *b\n  port: 4242\n")
    data, positions = yamlfile.load(path)
    assert data["copy"] == {"port": 4242, "host": "pacs"}
    assert positions[("copy", "port")] == (4, 3)


def test_files_without_duplicates_load_as_before(tmp_path):
    seed = ROOT / "rules" / "examples" / "seed.yaml"
    data, positions = yamlfile.load(seed)
    assert data == yaml.safe_load(seed.read_text(encoding="utf-8"))
    assert positions[("destinations",)][0] > 1
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert yamlfile.load(empty) == ({}, {})


def test_syntax_errors_are_still_located(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [unclosed\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:3:") and "not valid YAML" in problem


# --- each kind of file, through the loader nnrouter uses for it ------------------------


def test_config_check_refuses_a_duplicate(tmp_path, capsys):
    path = tmp_path / "nnrouter.yaml"
    path.write_text("dicom:\n  port: 104\n  ae_title: ROUTER\n  port: 11112\n")
    assert main(["config", "check", "--config", str(path)]) == 1
    assert f"{path}:4:3: dicom.port: duplicate key 'port' (first at line 2)" in capsys.readouterr().err


def test_rules_check_refuses_a_duplicate(tmp_path, capsys):
    text = (ROOT / "rules" / "examples" / "seed.yaml").read_text(encoding="utf-8")
    first = text.splitlines().index("destinations:") + 1
    path = tmp_path / "rules.yaml"
    path.write_text(text + "destinations: []\n")
    last = len(path.read_text().splitlines())
    assert main(["rules", "check", str(path)]) == 1
    assert (
        f"{path}:{last}:1: destinations: duplicate key 'destinations' (first at line {first})"
        in capsys.readouterr().err
    )


def test_procedures_check_refuses_a_duplicate(tmp_path, capsys):
    path = tmp_path / "procedures.yaml"
    path.write_text("class_codes: true\nprocedures: []\nclass_codes: false\n")
    assert main(["procedures", "check", str(path)]) == 1
    assert f"{path}:3:1: class_codes: duplicate key 'class_codes' (first at line 1)" in capsys.readouterr().err


def test_label_mapping_refuses_a_duplicate(tmp_path):
    from nnrouter.training import dataset

    text = (ROOT / "rules" / "labels.yaml").read_text(encoding="utf-8")
    key = next(line.split(":", 1)[0] for line in text.splitlines() if line and line[0].isalpha() and ":" in line)
    first = text.splitlines().index(next(line for line in text.splitlines() if line.startswith(key + ":"))) + 1
    path = tmp_path / "labels.yaml"
    path.write_text(text.rstrip("\n") + f"\n{key}: []\n")
    last = len(path.read_text().splitlines())
    with pytest.raises(yamlfile.FileProblems) as err:
        dataset.load_rules(path)
    assert str(err.value) == f"{path}:{last}:1: {key}: duplicate key '{key}' (first at line {first})"


def test_model_card_refuses_a_duplicate(tmp_path):
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    shutil.copy(ROOT / "models" / "nnrouter-view" / "model.yaml", tmp_path / "model.yaml")
    load_card(tmp_path)  # the shipped card is fine
    card = tmp_path / "model.yaml"
    text = card.read_text(encoding="utf-8")
    first = text.splitlines().index(next(line for line in text.splitlines() if line.startswith("name:"))) + 1
    card.write_text(text.rstrip("\n") + "\nname: another-model\n")
    last = len(card.read_text().splitlines())
    with pytest.raises(
        ModelCardError, match=rf"model\.yaml:{last}:1: name: duplicate key 'name' \(first at line {first}\)"
    ):
        load_card(tmp_path)
