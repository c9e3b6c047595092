"""Exit codes a script can act on: 1 the answer is no, 3 what the command was given cannot be used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

from nnrouter.testing.synthetic import write_series

SEED = REPO / "rules" / "examples" / "seed.yaml"


def nnrouter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnrouter", *args], check=False, capture_output=True, text=True, timeout=120
    )


def config(tmp_path: Path, **sections: dict) -> Path:
    cfg = {
        "database": {"url": f"sqlite:///{tmp_path / 'nnrouter.db'}"},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "models": {"classifier": None, "detector": None},
        "logging": {"format": "json"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "nnrouter.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_bad_config_file_is_3_for_a_command_and_1_for_the_check(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: lots\n")
    used = nnrouter("status", "--config", str(bad))
    assert used.returncode == 3, used.stderr
    assert "configuration is not valid" in used.stderr and "bad.yaml:2" in used.stderr and "dicom.port" in used.stderr
    checked = nnrouter("config", "check", "--config", str(bad))
    assert checked.returncode == 1 and "bad.yaml:2" in checked.stderr  # the check ran; its answer is no
    checked = nnrouter("config", "check", "--config", str(bad), "--json")
    answer = json.loads(checked.stdout)
    assert checked.returncode == 1 and answer["ok"] is False
    assert [(p["line"], p["field"]) for p in answer["problems"]] == [(2, "dicom.port")]


def test_a_schema_behind_the_migrations_is_3(tmp_path):
    cfg = config(tmp_path)
    res = nnrouter("clean", "--dry-run", "--config", str(cfg))
    assert res.returncode == 3 and "nnrouter db upgrade" in res.stderr
    assert nnrouter("db", "upgrade", "--config", str(cfg)).returncode == 0
    res = nnrouter("clean", "--dry-run", "--json", "--config", str(cfg))
    assert res.returncode == 0 and json.loads(res.stdout)["dry_run"] is True


def test_stages_without_rules_are_3(tmp_path):
    cfg = config(tmp_path, routing={"rules": None})
    for stage in ("route", "forward"):
        res = nnrouter(stage, "--config", str(cfg))
        assert res.returncode == 3 and "routing.rules is not set" in res.stderr, (stage, res.stderr)


def test_a_bad_rules_file_is_3_for_a_dry_run_and_1_for_the_check(tmp_path):
    bad = tmp_path / "routes.yaml"
    bad.write_text("rules:\n  - name: x\n    then: {forward: [nowhere]}\n")
    files = write_series(tmp_path / "in", 1, rows=32, columns=32)
    res = nnrouter("rules", "test", "--rules", str(bad), str(files[0]), "--config", str(config(tmp_path)))
    assert res.returncode == 3 and "routes.yaml:1:1: destinations" in res.stderr
    res = nnrouter("rules", "check", str(bad), "--config", str(config(tmp_path)), "--json")
    answer = json.loads(res.stdout)
    assert res.returncode == 1 and answer["ok"] is False and answer["problems"]
    assert all(p["file"] == str(bad) for p in answer["problems"])


def test_rules_test_json_says_what_each_rule_decided(tmp_path):
    write_series(tmp_path / "in", 2, rows=32, columns=32)
    res = nnrouter("rules", "test", "--rules", str(SEED), str(tmp_path / "in"), "--json")
    assert res.returncode == 0, res.stderr
    (study,) = json.loads(res.stdout)
    assert study["instances"] == 2 and study["flags"] == []
    assert any(r["rule"] == "everything_to_pacs" and r["matched"] for r in study["rules"])
    assert any(d["destination"] == "pacs" for d in study["deliveries"])
    assert study["hold"] is False and study["discard"] is False


def test_serve_refuses_an_unusable_model_with_3(node_factory, tmp_path):
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    node = node_factory(settings={"workers": {"count": 1}, "models": {"classifier": str(not_a_model)}})
    node.write_config()
    node.cli("db", "upgrade")
    res = node.cli("serve", check=False)
    assert res.returncode == 3 and "models.classifier cannot be used" in res.stderr


def test_models_run_on_an_unusable_model_is_3(tmp_path):
    empty = tmp_path / "m"
    empty.mkdir()
    res = nnrouter("models", "run", str(empty), str(write_series(tmp_path / "in", 1, rows=32, columns=32)[0]))
    assert res.returncode == 3 and str(empty) in res.stderr and "Traceback" not in res.stderr
