"""The web stage as it runs: `nnrouter web` alone over HTTPS, and inside `serve`, ready only with every stage alive."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from conftest import needs, tls_files
from dicomfiles import wait_for

from nnrouter.testing import peers

PASSWORD = "another long password"


@needs("openssl")
def test_nnrouter_web_alone_serves_https_with_secure_cookies_and_stops_on_sigterm(tmp_path: Path) -> None:
    tls = tls_files(tmp_path / "tls")
    port = peers.free_port()
    config = tmp_path / "nnrouter.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
                "models": {"classifier": None, "detector": None},
                "http": {"port": port, "tls": {"cert": str(tls["server.pem"]), "key": str(tls["server.key"])}},
                "logging": {"format": "json"},
            }
        )
    )
    run = [sys.executable, "-m", "nnrouter"]
    subprocess.run([*run, "db", "upgrade", "--config", str(config)], check=True, capture_output=True, timeout=120)
    added = subprocess.run(
        [*run, "users", "add", "ops", "--role", "admin", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NNROUTER_PASSWORD": PASSWORD},
    )
    assert added.returncode == 0, added.stderr
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen([*run, "web", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        peers.wait_port(port, timeout=60, proc=proc)
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(tls["ca.pem"])),
            timeout=20,
        ) as c:
            assert c.get("/healthz").json() == {"status": "alive"}
            # No serve on this node: ready means database, schema and spool.
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text
            login = c.get("/login")
            cookie = login.headers["set-cookie"]
            assert "secure" in cookie.lower() and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        # Plain HTTP to the HTTPS port gets no page.
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert plain.status_code >= 400
        except httpx.HTTPError:
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # The tokenised login of a script works the same over the API.
    token = subprocess.run(
        [*run, "users", "token", "ops", "--json", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert token.returncode == 0 and len(json.loads(token.stdout)["token"]) > 30


def test_the_console_in_serve_is_ready_once_every_stage_beats(node_factory) -> None:  # type: ignore[no-untyped-def]
    web_port = peers.free_port()
    node = node_factory(settings={"http": {"enabled": True, "bind": "127.0.0.1", "port": web_port}}).start()
    peers.wait_port(web_port, timeout=60)
    base = f"http://127.0.0.1:{web_port}"

    def ready() -> bool | dict:
        r = httpx.get(f"{base}/readyz", timeout=10).json()
        return r["ready"] or r

    wait_for(ready, timeout=60)
    stages = httpx.get(f"{base}/readyz", timeout=10).json()["stages"]
    assert {"nnrouter-scp", "nnrouter-web", "nnrouter-cleaner"} <= set(stages), stages
    # A stage killed is replaced by the supervisor, and the beats in the store follow it.
    cleaner = stages["nnrouter-cleaner"]["pid"]
    os.kill(cleaner, signal.SIGKILL)
    wait_for(
        lambda: (
            httpx.get(f"{base}/readyz", timeout=10).json()["stages"]["nnrouter-cleaner"]["pid"] != cleaner
            or "not replaced yet"
        ),
        timeout=60,
    )
    wait_for(ready, timeout=60)
    node.stop()
