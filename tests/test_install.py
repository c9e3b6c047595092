"""nnrouter as a site installs it: from the wheel, started in a folder that is not the checkout.

The checkout's tests all run the editable install, where the default models
and procedures are found beside the package because the repo is there. A
wheel carries only what pyproject.toml puts in it, so this builds one,
installs it where the checkout cannot be seen, and runs the service from
``/`` on a config that names no model and no procedures file: the defaults
must come from the wheel itself.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import yaml
from conftest import REPO, needs, pydicom_data

from nnrouter.pixels.modelcard import load_card
from nnrouter.testing import peers


def test_a_site_file_wins_and_the_rest_comes_from_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site's own procedures.yaml where nnrouter runs wins; what it lacks comes from the checkout.

    The chdir comes after nnrouter.core.config was imported: the defaults are
    looked up at load, from where the service is, not when the module was imported.
    """
    from nnrouter.core.config import load

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "procedures.yaml").write_text((REPO / "rules" / "procedures.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    settings = load(None)
    assert settings.orders.procedures == Path("rules/procedures.yaml")
    assert settings.models.classifier == REPO / "models" / "nnrouter-view"
    assert settings.models.detector == REPO / "models" / "nnrouter-regions"


def test_the_package_data_comes_last_and_a_path_found_nowhere_stays_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a checkout (an installed wheel), the copy beside the package is used; else the reader names the path."""
    from nnrouter.core import config

    package_data = tmp_path / "_shipped"
    (package_data / "models" / "nnrouter-view").mkdir(parents=True)
    monkeypatch.setattr(config, "_CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.setattr(config, "_PACKAGE_DATA", package_data)
    monkeypatch.chdir(tmp_path)
    settings = config.load(None)
    assert settings.models.classifier == package_data / "models" / "nnrouter-view"
    assert settings.models.detector == Path("models/nnrouter-regions")
    assert config.shipped_path(Path("/abs/models/x")) == Path("/abs/models/x")


def _install_wheel(tmp: Path) -> Path:
    """A venv holding nnrouter from a freshly built wheel; its ``bin`` folder.

    Why not a venv that installs the wheel with its dependencies: several of
    them (onnxruntime-gpu, pynetdicom, highdicom, python-gdcm, the pylibjpeg
    plugins) are not in this machine's local indexes (/opt/pypi, /opt/wheels),
    so that would mean fetching some hundreds of MB from PyPI on every run, or
    failing offline. Why not ``--system-site-packages``: the base interpreter
    lacks nnrouter's dependencies; they are in the checkout's .venv, which
    also holds the editable install. So the venv gets the wheel alone (``--no-deps``) and a .pth naming
    the .venv's site-packages as a plain path. A plain path is appended to
    sys.path without the .pth files in it being run, so the editable hook
    (``_editable_impl_nnrouter.pth``, which adds the checkout) stays inert, and
    the venv's own site-packages, with the wheel's nnrouter, comes first.
    The test checks both before it starts anything.
    """
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(wheels)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("nnrouter-*.whl")
    env = tmp / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    own = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    deps = Path(sysconfig.get_paths()["purelib"])
    assert deps.resolve() != REPO.resolve()
    (own / "nnrouter-test-deps.pth").write_text(f"{deps}\n")
    return env / "bin"


def _python(bin_dir: Path, code: str) -> str:
    return subprocess.run(
        [str(bin_dir / "python"), "-c", code],
        cwd="/",
        env=_env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


def _env() -> dict[str, str]:
    """The environment without whatever would lead Python back to the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")} | {
        "PYTHONUNBUFFERED": "1"
    }


def _predictions(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT model_name, label FROM prediction").fetchall()


@pytest.mark.slow
@needs("echoscu", "storescu")
def test_installed_wheel_serves_from_any_folder_with_its_shipped_model(tmp_path: Path) -> None:
    bin_dir = _install_wheel(tmp_path)
    where = _python(bin_dir, "import sys, nnrouter; print(nnrouter.__file__); print('\\n'.join(sys.path))").splitlines()
    assert where[0].startswith(str(tmp_path / "venv")), f"nnrouter imported from {where[0]}, not from the wheel"
    assert not any(Path(p).resolve() == REPO.resolve() for p in where[1:] if p), "the checkout is on sys.path"

    home = tmp_path / "site"
    home.mkdir()
    db = home / "nnrouter.db"
    port = peers.free_port()
    config = home / "nnrouter.yaml"
    # Only where this site keeps its data (and a free port): models and
    # procedures are left to their defaults, which must be found in the wheel.
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"port": port, "bind": "127.0.0.1"},
                "storage": {"path": str(home / "spool"), "derived_path": str(home / "derived"), "min_free_mb": 50},
                "database": {"url": f"sqlite:///{db}"},
            }
        )
    )
    nnrouter = str(bin_dir / "nnrouter")

    listed = subprocess.run(
        [nnrouter, "models", "list", "--json"],
        check=False,
        cwd="/",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    shipped = {load_card(REPO / "models" / n).name for n in ("nnrouter-view", "nnrouter-regions")}
    assert {row["name"] for row in json.loads(listed.stdout)} == shipped

    upgrade = subprocess.run(
        [nnrouter, "db", "upgrade", "--config", str(config)],
        check=False,
        cwd="/",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr

    log_path = home / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [nnrouter, "serve", "--config", str(config)], cwd="/", env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        try:
            peers.wait_port(port, timeout=60, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}; serve said:\n{log_path.read_text(errors='replace')[-3000:]}")
        echo = subprocess.run(
            ["echoscu", "-aec", "NNROUTER", "127.0.0.1", str(port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
        film = pydicom_data("RG1_UNCI.dcm")
        sent = peers.storescu(
            port, [film], config=peers.storescu_config([film], tmp_path / "storescu.cfg"), timeout=120
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr

        view = load_card(REPO / "models" / "nnrouter-view").name
        deadline = time.monotonic() + 180
        rows = _predictions(db)
        while not rows and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            rows = _predictions(db)
        assert [name for name, _ in rows] == [view], (
            f"predictions {rows}; serve said:\n{log_path.read_text(errors='replace')[-3000:]}"
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]
