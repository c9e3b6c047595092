"""Configuration: one YAML file, environment on top, errors a person can act on."""

from __future__ import annotations

import pytest
import yaml

from nnrouter.cli import main
from nnrouter.core import config
from nnrouter.core.yamlfile import FileProblems


def test_example_is_complete_and_equals_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config.EXAMPLE)
    loaded = config.load(path)
    assert loaded == config.load(None)
    # Every key of the model appears in the example, so nothing is undocumented.
    data = yaml.safe_load(config.EXAMPLE)
    for section, model in config.Settings.model_fields.items():
        assert set(data[section]) == set(model.annotation.model_fields), section


def test_issue_keys_exist():
    s = config.load(None)
    assert (s.dicom.ae_title, s.dicom.port) == ("NNROUTER", 11112)
    for key in ("bind", "allowed_calling_aes", "max_associations", "max_pdu"):
        assert hasattr(s.dicom, key)
    assert s.storage.path and s.storage.min_free_mb >= 0
    assert s.database.url.startswith("sqlite")
    assert s.logging.format == "auto"  # console lines on a terminal, JSON lines elsewhere


def test_environment_overrides_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("dicom:\n  port: 104\n  ae_title: FROMFILE\n")
    monkeypatch.setenv("NNROUTER_DICOM__PORT", "4242")
    monkeypatch.setenv("NNROUTER_DICOM__ALLOWED_CALLING_AES", '[{"ae_title": "CR1", "host": "10.0.0.1"}]')
    s = config.load(path)
    assert s.dicom.port == 4242
    assert s.dicom.ae_title == "FROMFILE"
    assert s.dicom.allowed_calling_aes[0].host == "10.0.0.1"


def test_errors_name_file_line_key_and_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "dicom:\n"
        "  port: 70000\n"
        "  ae_title: THIS_TITLE_IS_TOO_LONG\n"
        "  allowed_calling_aes:\n"
        "    - host: 10.0.0.1\n"
        "storage:\n"
        "  min_free_gb: 3\n"
    )
    with pytest.raises(FileProblems) as err:
        config.load(path)
    text = str(err.value)
    assert f"{path}:2:" in text and "dicom.port" in text and "65535" in text
    assert f"{path}:3:" in text and "dicom.ae_title" in text and "16 characters" in text
    assert "dicom.allowed_calling_aes[0].ae_title" in text and "required" in text.lower()
    assert f"{path}:7:" in text and "storage.min_free_gb" in text and "unknown field" in text
    assert len(err.value.problems) == 4


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dicom:\n  port: [1, 2\n")
    with pytest.raises(FileProblems) as err:
        config.load(path)
    assert err.value.problems[0].line is not None and "not valid YAML" in str(err.value)


def test_cli_config_check(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    assert main(["config", "example"]) == 0
    good.write_text(capsys.readouterr().out)
    assert main(["config", "check", "--config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging:\n  format: xml\n")
    assert main(["config", "check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "logging.format" in err and "bad.yaml:2:" in err
