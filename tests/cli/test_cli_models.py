"""Model folders from the command line: --json is one document on stdout, the model's own log lines go to stderr."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, pydicom_data

VIEW, REGIONS = REPO / "models" / "nnrouter-view", REPO / "models" / "nnrouter-regions"


def nnrouter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnrouter", *args], check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_models_list_verify_and_run_as_json():
    listed = nnrouter("models", "list", "--json")
    assert listed.returncode == 0
    assert {(r["name"], r["task"]) for r in json.loads(listed.stdout)} >= {
        ("nnrouter-view", "classify"),
        ("nnrouter-regions", "detect"),
    }
    verified = nnrouter("models", "verify", str(VIEW), str(REGIONS), "--json")
    assert verified.returncode == 0 and [r["ok"] for r in json.loads(verified.stdout)] == [True, True]

    chest = pydicom_data("RG1_UNCI.dcm")
    ran = nnrouter("models", "run", str(VIEW), str(chest), "--json")
    assert ran.returncode == 0, ran.stderr
    (row,) = json.loads(ran.stdout)  # the whole of stdout: model_loaded is logged on stderr
    assert row["file"] == str(chest) and row["label"] == "chest_pa_ap" and row["top"][0][0] == "chest_pa_ap"
    assert "model_loaded" in ran.stderr

    junk = REPO / "README.md"
    ran = nnrouter("models", "run", str(REGIONS), str(chest), str(junk), "--json")
    rows = json.loads(ran.stdout)
    assert ran.returncode == 1 and rows[0]["regions"] and "error" in rows[1] and rows[1]["file"] == str(junk)
