"""The console and API in process (FastAPI's TestClient over the real app, a real SQLite store, real files).

Logins, roles, CSRF, the brake on guessing, rule edits with their versions,
flag reviews, outbox actions and health. The browser test drives the same
app through Chromium against a running node.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select

from nnrouter.core.config import Settings
from nnrouter.core.store import Audit, Flag, Instance, Outbox, OutboxState, RulesVersion, Series, Store, Study
from nnrouter.orders import reviews
from nnrouter.web import users
from nnrouter.web.app import create_app

RULES = {
    "destinations": [{"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": 11199}],
    "rules": [{"name": "everything", "when": {"modality": ["DX", "CR"]}, "then": {"forward": ["PACS"]}}],
}
PASSWORD = "correct horse battery"


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(RULES, sort_keys=False))
    settings = Settings(
        storage={"path": str(tmp_path / "spool"), "min_free_mb": 1, "derived_path": str(tmp_path / "derived")},
        database={"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        routing={"rules": str(rules_file)},
        models={"classifier": None, "detector": None},
        node={"name": "n1"},
    )
    (tmp_path / "spool").mkdir()
    store = Store(settings.database.url)
    store.upgrade()
    users.add(store, "ada", "admin", PASSWORD)
    users.add(store, "vic", "viewer", PASSWORD)
    yield settings, store
    store.dispose()


def client(settings: Settings, store: Store) -> TestClient:
    return TestClient(create_app(settings, store, expect_stages=False), follow_redirects=False)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def logged_in(settings: Settings, store: Store, name: str = "ada") -> tuple[TestClient, str]:
    c = client(settings, store)
    token = csrf_of(c.get("/login").text)
    r = c.post("/login", data={"name": name, "password": PASSWORD, "next": "/", "csrf": token})
    assert r.status_code == 303, r.text
    return c, csrf_of(c.get("/").text)


def test_nothing_is_served_without_a_login(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c = client(settings, store)
    for path in ("/", "/studies", "/rules/rules", "/outbox", "/models", "/mismatches"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    assert c.get("/api/status").status_code == 401
    assert c.get("/healthz").json() == {"status": "alive"}


def test_a_wrong_password_is_refused_audited_and_braked(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c = client(settings, store)
    token = csrf_of(c.get("/login").text)
    for _ in range(settings.http.login_failures):
        r = c.post("/login", data={"name": "ada", "password": "wrong one!", "csrf": token})
        assert "wrong user name or password" in r.text
    # Now even the right password waits for the window.
    r = c.post("/login", data={"name": "ada", "password": PASSWORD, "csrf": token})
    assert "too many failed logins" in r.text
    with store.read() as s:
        results = [a.result for a in s.execute(select(Audit).where(Audit.action == "login")).scalars()]
    assert results.count("refused") == settings.http.login_failures and results[-1] == "limited"


def test_a_change_without_the_csrf_token_is_refused(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store)
    text = Path(settings.routing.rules).read_text()
    r = c.put("/api/rules/rules", json={"text": text + "\n# no token\n"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = c.put("/api/rules/rules", json={"text": text + "\n# with token\n"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["saved"] is True
    assert Path(settings.routing.rules).read_text().endswith("# with token\n")


def test_a_viewer_sees_but_cannot_save_rules(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store, "vic")
    assert c.get("/rules/rules").status_code == 200
    before = Path(settings.routing.rules).read_text()
    r = c.put("/api/rules/rules", json={"text": before + "\n#\n"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 403 and "viewer" in r.json()["detail"]
    assert Path(settings.routing.rules).read_text() == before


def test_a_rule_with_a_typo_is_refused_at_its_line_and_nothing_changes(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store)
    good = Path(settings.routing.rules).read_text()
    bad = good.replace("forward:", "froward:")
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "froward" in text)
    r = c.post("/api/rules/rules/check", json={"text": bad}, headers={"X-CSRF-Token": token})
    assert r.json()["ok"] is False
    assert any(p["line"] == line and p["column"] for p in r.json()["problems"]), r.json()
    r = c.put("/api/rules/rules", json={"text": bad}, headers={"X-CSRF-Token": token})
    assert r.status_code == 422
    assert Path(settings.routing.rules).read_text() == good
    with store.read() as s:
        assert s.execute(select(RulesVersion)).first() is None


def test_every_saved_version_is_kept_with_its_diff_and_comes_back(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store)
    original = Path(settings.routing.rules).read_text()
    edited = original.replace("port: 11199", "port: 11200")
    r = c.put("/api/rules/rules", json={"text": edited, "comment": "new port"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200
    versions = c.get("/api/rules/rules/versions").json()
    assert [v["saved_by"] for v in versions] == ["ada", "(file)"]
    assert "-  port: 11199" in versions[0]["diff"] and "+  port: 11200" in versions[0]["diff"]
    first = versions[1]["id"]
    r = c.post(f"/versions/{first}/restore", data={"csrf": token})
    assert r.status_code == 303
    assert Path(settings.routing.rules).read_text() == original
    newest = c.get("/api/rules/rules/versions").json()[0]
    assert newest["restored_from"] == first and newest["saved_by"] == "ada"
    with store.read() as s:
        actions = [a.action for a in s.execute(select(Audit).order_by(Audit.id)).scalars()]
    assert "rules_save" in actions and "version_restore" in actions


def _study_with_flag(store: Store) -> tuple[str, int]:
    with store.write() as s:
        study = Study(study_uid="1.2.3.4", accession_number="A1", patient_id="PID-77", patient_name="Doe^Jane")
        series = Series(study=study, series_uid="1.2.3.4.1", modality="DX")
        inst = Instance(
            series=series,
            sop_instance_uid="1.2.3.4.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/nonexistent",
            size_bytes=1,
            sha256="0" * 64,
            state="classified",
        )
        s.add_all([study, series, inst])
        s.flush()
        s.add(Flag(study_id=study.id, kind="view_missing", severity="warning", reason="no lateral", evidence={}))
        s.add(Outbox(instance_id=inst.id, destination="PACS", rule="everything", state=OutboxState.DEAD))
        return study.study_uid, study.id


def test_a_resolved_flag_is_kept_and_no_longer_counts_as_a_mismatch(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    uid, study_id = _study_with_flag(store)
    c, token = logged_in(settings, store, "vic")  # reviewing flags is a technologist's work, not an admin's
    r = c.post(
        "/api/mismatches/review",
        json={"study_uid": uid, "kind": "view_missing", "state": "resolved"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 422 and "comment" in r.json()["detail"]
    with store.read() as s:
        assert reviews.open_kinds(s, study_id) == {"view_missing"}
    r = c.post(
        "/mismatches/review",
        data={
            "csrf": token,
            "study_uid": uid,
            "kind": "view_missing",
            "state": "resolved",
            "comment": "lateral taken on the next visit",
        },
    )
    assert r.status_code == 303
    with store.read() as s:
        assert reviews.open_kinds(s, study_id) == frozenset()
    shown = c.get(f"/api/studies/{uid}").json()["flags"][0]["review"]
    assert shown["state"] == "resolved" and shown["by"] == "vic"
    assert c.get("/api/mismatches?unresolved=true").json() == []


def test_patient_fields_only_for_a_login_and_never_from_a_url(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    uid, _ = _study_with_flag(store)
    anonymous = settings.model_copy(update={"http": settings.http.model_copy(update={"allow_anonymous_read": True})})
    c = client(anonymous, store)
    page = c.get("/studies")
    assert page.status_code == 200 and "A1" in page.text and "Doe^Jane" not in page.text and "PID-77" not in page.text
    assert "PID-77" not in c.get(f"/studies/{uid}").text
    assert c.get(f"/api/studies/{uid}/patient").status_code == 401
    assert c.post("/api/outbox/retry", json={}).status_code == 401  # reading only
    # A patient ID in the query string is ignored; the search takes it in the body.
    c, token = logged_in(settings, store)
    assert c.get("/studies?patient_id=nobody").text.count("Doe^Jane") == 1
    found = c.post("/api/studies/search", json={"patient_id": "PID-77"}, headers={"X-CSRF-Token": token}).json()
    assert [st["study_uid"] for st in found["studies"]] == [uid] and found["studies"][0]["patient_name"] == "Doe^Jane"
    assert (
        c.post("/api/studies/search", json={"patient_id": "other"}, headers={"X-CSRF-Token": token}).json()["total"]
        == 0
    )


def test_outbox_retry_pause_and_resume_from_the_api(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    _study_with_flag(store)
    c, token = logged_in(settings, store)
    h = {"X-CSRF-Token": token}
    r = c.post("/api/outbox/retry", json={"destinations": ["PACS"]}, headers=h).json()
    assert r["queued"] == 1 and r["states"] == ["dead", "failed", "held"]
    assert c.get("/api/outbox?state=pending").json()[0]["state"] == "pending"
    assert c.post("/api/destinations/PACS/pause", json={}, headers=h).json()["changed"] is True
    assert "PACS" in c.get("/api/outbox/summary").json()["paused"]
    assert c.post("/api/destinations/PACS/resume", json={}, headers=h).json()["changed"] is True
    assert c.get("/api/outbox/summary").json()["paused"] == {}


def test_readyz_says_what_is_missing(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    r = TestClient(create_app(settings, store, expect_stages=True)).get("/readyz")
    assert r.status_code == 503 and any("no supervisor" in x for x in r.json()["reasons"])
    assert client(settings, store).get("/readyz").status_code == 200


def test_the_openapi_document_lists_the_api(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    doc = client(settings, store).get("/api/openapi.json").json()
    for path in (
        "/api/status",
        "/api/studies/{study_uid}",
        "/api/rules/{kind}",
        "/api/outbox/retry",
        "/api/mismatches/review",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in doc["paths"], path


def test_the_api_and_the_cli_json_agree(node, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from nnrouter.cli import main

    settings, store = node
    uid, _ = _study_with_flag(store)
    config = tmp_path / "cli.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(settings.storage.path), "min_free_mb": 1},
                "database": {"url": settings.database.url},
                "routing": {"rules": str(settings.routing.rules)},
                "models": {"classifier": None, "detector": None},
                "node": {"name": "n1"},
            }
        )
    )
    c, _ = logged_in(settings, store)
    import json

    for argv, path in (
        (["status", "--json"], "/api/status"),
        (["study", "show", uid, "--json"], f"/api/studies/{uid}"),
        (["outbox", "list", "--json"], "/api/outbox"),
        (["mismatches", "--json"], "/api/mismatches"),
    ):
        capsys.readouterr()  # what came before (the login's log line)
        assert main([*argv, "--config", str(config)]) == 0
        printed = json.loads(capsys.readouterr().out)
        served = c.get(path).json()
        if path == "/api/status":  # measured afresh each time: only the shape and the counts must agree
            assert set(printed) == set(served) and printed["instances"] == served["instances"]
        else:
            assert printed == served, path


def test_a_save_over_a_change_made_meanwhile_is_refused(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store)
    h = {"X-CSRF-Token": token}
    loaded = c.get("/api/rules/rules").json()
    rules_file = Path(settings.routing.rules)
    by_hand = loaded["text"].replace("port: 11199", "port: 11300")
    rules_file.write_text(by_hand)  # someone edits the file on the server meanwhile
    mine = loaded["text"] + "\n# mine\n"
    r = c.put("/api/rules/rules", json={"text": mine, "base_digest": loaded["digest"]}, headers=h)
    assert r.status_code == 409 and "changed since" in r.json()["detail"]
    assert rules_file.read_text() == by_hand
    fresh = c.get("/api/rules/rules").json()
    r = c.put(
        "/api/rules/rules", json={"text": fresh["text"] + "\n# mine\n", "base_digest": fresh["digest"]}, headers=h
    )
    assert r.status_code == 200 and rules_file.read_text().endswith("# mine\n")


def test_an_anonymous_reader_gets_no_pixels_and_no_delivery_errors(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    uid, _ = _study_with_flag(store)
    with store.write() as s:
        s.execute(Outbox.__table__.update().values(last_error="peer said: no such patient Doe^Jane"))
    anonymous = settings.model_copy(update={"http": settings.http.model_copy(update={"allow_anonymous_read": True})})
    c = client(anonymous, store)
    assert c.get("/api/instances/1.2.3.4.1.1/thumbnail.png").status_code == 401
    assert c.get("/api/instances/1.2.3.4.1.1/cam.png").status_code == 401
    assert "Doe^Jane" not in c.get("/api/outbox").text and "Doe^Jane" not in c.get(f"/api/studies/{uid}").text
    assert "Doe^Jane" not in c.get("/outbox?destination=PACS").text
    c, _ = logged_in(settings, store)
    assert "Doe^Jane" in c.get("/api/outbox").text  # a logged-in user sees what went wrong


def test_a_script_uses_a_token_without_csrf_and_the_token_ends_with_a_new_password(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c = client(settings, store)
    admin_token = users.new_token(store, "ada")
    viewer_token = users.new_token(store, "vic")
    text = Path(settings.routing.rules).read_text() + "\n# by a script\n"
    r = c.put("/api/rules/rules", json={"text": text}, headers={"Authorization": f"Bearer {viewer_token}"})
    assert r.status_code == 403
    r = c.put("/api/rules/rules", json={"text": text}, headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 200 and r.json()["version"]["saved_by"] == "ada"
    assert c.get("/api/status", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    users.add(store, "ada", "admin", "a brand new password", replace=True)
    assert c.get("/api/status", headers={"Authorization": f"Bearer {admin_token}"}).status_code == 401


def test_a_logout_ends_the_login_everywhere_a_copied_cookie_included(node) -> None:  # type: ignore[no-untyped-def]
    settings, store = node
    c, token = logged_in(settings, store)
    copy = client(settings, store)
    copy.cookies.update(dict(c.cookies))
    assert copy.get("/api/status").status_code == 200
    assert c.post("/logout", data={"csrf": token}).status_code == 303
    assert copy.get("/api/status").status_code == 401
    c, _ = logged_in(settings, store, "vic")
    users.set_disabled(store, "vic", True)
    assert c.get("/api/status").status_code == 401
