"""Shared fixtures: real peers on loopback, a real PostgreSQL, the shared data.

Nothing here mocks the network or the database: DCMTK tools, PostgreSQL and
nnrouter itself run as processes, on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import glob
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from nnrouter import peers

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DICOM = SHARED / "data" / "dicom"
RADIOGRAPHS = SHARED / "data" / "radiographs"


def shared_files(kind: str) -> list[Path]:
    return sorted((SHARED_DICOM / kind).glob("*.dcm"))


needs_shared = pytest.mark.skipif(
    not SHARED_DICOM.is_dir(), reason=f"{SHARED_DICOM} is absent (it is present in CI, not on users' machines)"
)


def needs(*tools: str):  # type: ignore[no-untyped-def]
    missing = peers.have(*tools)
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)} (run `make test`, which installs them)")


def pydicom_data(name: str) -> Path:
    """A file from the pydicom-data package (real radiographs RG1, RG3)."""
    return Path(str(importlib.resources.files("data_store") / "data" / name))


# --- PostgreSQL: one throwaway cluster per test session ----------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; CI runs as root.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server in a temp folder; yields a URL prefix without a database name."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries not installed (run `make test`, which installs them)")
    base = Path(tempfile.mkdtemp(prefix="nnrouter-pg-"))
    os.chmod(base, 0o777)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    os.chmod(sock, 0o777)
    port = peers.free_port()
    subprocess.run(
        _as_postgres([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True,
    )
    proc = subprocess.Popen(
        _as_postgres([
            str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
            "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
        ]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        peers.wait_port(port, proc=proc)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def _new_pg_database(server_url: str) -> str:
    from sqlalchemy import create_engine, text

    name = "t_" + uuid.uuid4().hex[:12]
    engine = create_engine(server_url + "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):  # type: ignore[no-untyped-def]
    """A fresh, empty database on each engine nnrouter supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nnrouter.db'}"
    return _new_pg_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def node_factory(tmp_path):  # type: ignore[no-untyped-def]
    """Start ``nnrouter serve`` processes; all are stopped at the end of the test."""
    started: list[peers.Node] = []

    def make(name: str = "node", **kwargs) -> peers.Node:  # type: ignore[no-untyped-def]
        node = peers.Node(tmp_path / name, **kwargs)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def storescp(tmp_path):  # type: ignore[no-untyped-def]
    scp = peers.StoreSCP(tmp_path / "storescp").start()
    yield scp
    scp.stop()
