"""The console in a real browser (Debian's Chromium through Selenium) against a running node and real peers.

A study goes in through DCMTK storescu, is classified, routed and sent to a
DCMTK storescp; an admin then looks at it, edits the rules (a typo first),
dry-runs and saves, and the router sends the next study under the new
rule; a flag is resolved, a dead delivery retried, and a viewer is kept
from saving. Screenshots of every page are kept in
``var/test-artefacts/screenshots`` for a person to look at.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import SHARED_DICOM, needs
from dicomfiles import wait_for
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from nnrouter.testing import browser, peers

pytestmark = [
    needs("storescu", "storescp"),
    pytest.mark.slow,
    pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing())),
    pytest.mark.skipif(not (SHARED_DICOM / "good").is_dir(), reason=f"{SHARED_DICOM} is absent"),
]

SHOTS = Path(os.environ.get("NNROUTER_ARTEFACTS", Path(__file__).parents[2] / "var" / "test-artefacts")) / "screenshots"
PASSWORD = "a long admin password"
CHEST = SHARED_DICOM / "good" / "cr_chest_mono1_no_meta.dcm"


def fresh_study(src: Path, folder: Path, description: str, accession: str) -> Path:
    """The film as a new study (new UIDs), ordered as ``description``."""
    ds = dcmread(src, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # a file without its meta header
        implicit, _little = ds.original_encoding
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDescription, ds.AccessionNumber = description, accession
    ds.StudyDate = "20261204"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{accession}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def shot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def login(driver, base: str, name: str, password: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/studies")
    assert "/login" in driver.current_url  # no page without a login
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: "/login" not in driver.current_url or driver.current_url, timeout=20)


def flash(driver) -> str:  # type: ignore[no-untyped-def]
    """The message the page came back with; "" while the form's answer has not loaded yet."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, "flash")
    return found[0].text if found else ""


def session(driver, base: str) -> httpx.Client:  # type: ignore[no-untyped-def]
    """The browser's session cookie in an HTTP client, to check the image responses themselves."""
    jar = {c["name"]: c["value"] for c in driver.get_cookies()}
    return httpx.Client(base_url=base, cookies=jar, timeout=30)


def test_an_admin_works_a_study_through_the_console(node_factory, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    archive = peers.StoreSCP(tmp_path / "archive", aet="ARCHIVE").start()
    archive2 = peers.StoreSCP(tmp_path / "archive2", aet="ARCHIVE2").start()
    qa_port = peers.free_port()  # nobody listens yet: deliveries there fail, then die
    fast = {"max_retries": 1, "first_delay_s": 0.2, "multiplier": 1, "max_delay_s": 0.2}
    rules = {
        "settings": {"quiet_s": 0.5},
        "destinations": [
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port},
            {"name": "archive2", "ae_title": "ARCHIVE2", "host": "127.0.0.1", "port": archive2.port},
            {"name": "qa", "ae_title": "QA", "host": "127.0.0.1", "port": qa_port, "retry": fast},
        ],
        "rules": [
            {"name": "everything", "continue": True, "then": {"forward": ["archive"]}},
            {"name": "mismatches", "when": {"mismatch": "any"}, "then": {"forward": ["qa"]}},
        ],
    }
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    web_port = peers.free_port()
    node = node_factory(
        settings={
            "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 100},
            "models": {"classifier": "models/nnrouter-view", "detector": "models/nnrouter-regions"},
            "routing": {"rules": str(rules_file), "tick_s": 0.3},
            "http": {"enabled": True, "bind": "127.0.0.1", "port": web_port},
        }
    )
    node.write_config()
    node.cli("db", "upgrade")
    env_add = {"NNROUTER_PASSWORD": PASSWORD}
    for name, role in (("ada", "admin"), ("vic", "viewer")):
        r = subprocess.run(
            [sys.executable, "-m", "nnrouter", "users", "add", name, "--role", role, "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **env_add},
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
    node.start(upgrade=False)
    peers.wait_port(web_port, timeout=60)
    base = f"http://127.0.0.1:{web_port}"

    # A chest film ordered as a knee: classified, flagged, sent to the archive; QA is down.
    first = fresh_study(CHEST, tmp_path / "in1", "XR KNEE 2 VIEWS", "ACC1")
    sent = peers.storescu(node.port, [first])
    assert "Received Store Response (Success)" in sent.stderr, sent.stderr
    uid1 = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: len(files_in(archive.folder)) == 1 or files_in(archive.folder), timeout=180)

    def outbox(dest: str) -> list[dict]:
        return json.loads(node.cli("outbox", "list", "--destination", dest, "--json").stdout)

    wait_for(lambda: [r["state"] for r in outbox("qa")] == ["dead"] or outbox("qa"), timeout=120)

    stores = [archive, archive2, None]
    driver = browser.chromium(tmp_path / "chromium")
    try:
        login(driver, base, "ada", PASSWORD)
        shot(driver, "01-studies")
        assert "ACC1" in driver.page_source

        driver.get(f"{base}/")
        assert driver.find_element(By.ID, "chart").find_element(By.TAG_NAME, "svg")
        shot(driver, "02-dashboard")

        # The study page: thumbnail with regions, CAM overlay, flags, routing, layout.
        driver.get(f"{base}/studies/{uid1}")
        wait_for(
            lambda: (
                driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
                or "images still loading"
            ),
            timeout=60,
        )
        figure = driver.find_element(By.CSS_SELECTOR, "figure.image")
        assert figure.find_element(By.CSS_SELECTOR, "img.thumb") and figure.find_element(By.CSS_SELECTOR, "img.cam")
        assert "no flags" not in driver.find_element(By.ID, "flags").text
        assert "everything" in driver.find_element(By.ID, "decision").text
        shot(driver, "03-study")
        http = session(driver, base)
        sop = figure.get_attribute("data-sop")
        for path in (f"/api/instances/{sop}/thumbnail.png?regions=true", f"/api/instances/{sop}/cam.png"):
            r = http.get(path)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        # A change without the CSRF token is refused, with the session cookie and all.
        assert http.post("/api/outbox/retry", json={}).status_code == 403

        # Rules: a typo shows at its line and nothing changes.
        driver.get(f"{base}/rules/rules")
        original = rules_file.read_text()
        typo = original.replace("forward:\n    - archive\n", "froward:\n    - archive\n", 1)
        assert typo != original
        line = next(i for i, t in enumerate(typo.splitlines(), 1) if "froward" in t)
        set_text = (
            "const t = document.getElementById('text'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));"
        )
        driver.execute_script(set_text, typo)
        driver.find_element(By.ID, "save").click()
        wait_for(lambda: "not saved" in driver.find_element(By.ID, "result").text or "waiting", timeout=20)
        problems = driver.find_element(By.ID, "problems").text
        assert f"line {line}," in problems, problems
        assert rules_file.read_text() == original
        shot(driver, "04-rules-typo")

        # Fixed, and sent to archive2 instead: the dry run on the stored study shows the change.
        edited = original.replace("forward:\n    - archive\n", "forward:\n    - archive2\n", 1)
        driver.execute_script(set_text, edited)
        driver.find_element(By.ID, "check").click()
        wait_for(lambda: driver.find_element(By.ID, "result").text == "valid" or "checking", timeout=20)
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "study")).select_by_value(uid1)
        driver.find_element(By.ID, "dryrun").click()
        wait_for(lambda: "would change" in driver.find_element(By.ID, "result").text or "dry run", timeout=60)
        table = driver.find_element(By.ID, "dryrun-table").text
        assert "CHANGED" in table and "archive2" in table, table
        shot(driver, "05-rules-dryrun")
        driver.find_element(By.ID, "comment").send_keys("archive moved")
        driver.find_element(By.ID, "save").click()
        wait_for(lambda: "saved as version" in driver.find_element(By.ID, "result").text or "saving", timeout=20)
        assert rules_file.read_text() == edited
        driver.get(f"{base}/rules/rules")
        assert "archive moved" in driver.find_element(By.ID, "versions").text
        shot(driver, "06-rules-saved")

        # The router runs the saved version: the next study goes to archive2.
        status = lambda: json.loads(node.cli("status", "--json").stdout)["rules"]["running"]["digest"]  # noqa: E731
        wait_for(lambda: status() == hashlib.sha256(edited.encode()).hexdigest() or "old rules", timeout=60)
        second = fresh_study(CHEST, tmp_path / "in2", "XR CHEST", "ACC2")
        assert "Success" in peers.storescu(node.port, [second]).stderr
        wait_for(lambda: len(files_in(archive2.folder)) == 1 or files_in(archive2.folder), timeout=180)
        assert len(files_in(archive.folder)) == 1

        # Resolve the flag from the work list.
        driver.get(f"{base}/mismatches?unresolved=true")
        row = driver.find_element(By.CSS_SELECTOR, f'tr.flag[data-study="{uid1}"]')
        row.find_element(By.NAME, "comment").send_keys("knee film follows; chest was asked for by phone")
        shot(driver, "07-mismatches")
        row.find_element(By.CSS_SELECTOR, 'button[value="resolved"]').click()
        wait_for(lambda: "resolved" in flash(driver) or "no message", timeout=20)
        driver.get(f"{base}/mismatches")
        assert "resolved by ada" in driver.find_element(By.ID, "worklist").text
        shown = json.loads(node.cli("study", "show", uid1, "--json").stdout)
        assert {f["review"]["state"] for f in shown["flags"] if f["review"]} == {"resolved"}

        # The dead delivery to QA, retried once QA is up.
        qa = stores[2] = peers.StoreSCP(tmp_path / "qa", aet="QA", port=qa_port).start()
        driver.get(f"{base}/outbox?destination=qa")
        shot(driver, "08-outbox")
        driver.find_element(By.CSS_SELECTOR, "button.retry-row").click()
        wait_for(lambda: "queued again" in flash(driver) or "no message", timeout=20)
        wait_for(lambda: len(files_in(qa.folder)) >= 1 or "not at QA yet", timeout=120)

        driver.get(f"{base}/models")
        wait_for(
            lambda: (
                driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
                or "loading"
            ),
            timeout=30,
        )
        shot(driver, "09-models")
        driver.get(f"{base}/audit")
        audit_text = driver.find_element(By.ID, "audit").text
        for action in ("login", "rules_save", "flag_resolved", "outbox_retry"):
            assert action in audit_text, action
        shot(driver, "10-audit")

        # /metrics parses, and its counters agree with `nnrouter status --json`.
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(http.get("/metrics").text)
            for s in fam.samples
        }
        status_now = json.loads(node.cli("status", "--json").stdout)
        for state, n in status_now["instances"]["by_state"].items():
            assert metrics[("nnrouter_instances", (("state", state),))] == n
        for dest, states in status_now["outbox"].items():
            for state, n in states.items():
                key = ("nnrouter_deliveries_total", (("destination", dest), ("outcome", state)))
                assert metrics[key] == n, key

        # A viewer sees the rules but may not save them.
        driver.delete_all_cookies()
        login(driver, base, "vic", PASSWORD)
        driver.get(f"{base}/rules/rules")
        assert not driver.find_elements(By.ID, "save")
        assert "only an admin may save" in driver.page_source
        shot(driver, "11-rules-viewer")
        viewer = session(driver, base)
        token = driver.find_element(By.CSS_SELECTOR, 'meta[name="csrf-token"]').get_attribute("content")
        r = viewer.put("/api/rules/rules", json={"text": original}, headers={"X-CSRF-Token": token})
        assert r.status_code == 403
        assert rules_file.read_text() == edited
    finally:
        driver.quit()
        node.stop()
        for scp in stores:
            if scp is not None:
                scp.stop()
