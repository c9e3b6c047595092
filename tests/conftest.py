"""Shared fixtures: real peers on loopback, a real PostgreSQL, the shared data.

Nothing here mocks the network or the database: DCMTK tools, PostgreSQL and
nnrouter itself run as processes, on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from nnrouter.testing import peers

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
    return pytest.mark.skipif(
        bool(missing), reason=f"missing tools: {', '.join(missing)} (run `make test`, which installs them)"
    )


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


def init_pg_cluster(prefix: str = "nnrouter-pg-", base: Path | None = None) -> tuple[Path, Path]:
    """initdb in ``base`` (default: a new temp folder), data/ and a socket folder sock/: the binaries' folder and base.

    Skips the test when the PostgreSQL server binaries are not installed.
    """
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries not installed (run `make test`, which installs them)")
    base = Path(tempfile.mkdtemp(prefix=prefix)) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o777)
    (base / "sock").mkdir()
    os.chmod(base / "sock", 0o777)
    subprocess.run(
        _as_postgres(
            [
                str(pg_bin / "initdb"),
                "-D",
                str(base / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    return pg_bin, base


def tls_files(folder: Path) -> dict[str, Path]:
    """Throwaway TLS files made with openssl: a CA, a server certificate for 127.0.0.1, a client certificate, and another CA that signed neither."""
    folder.mkdir(parents=True, exist_ok=True)
    f = {
        n: folder / n
        for n in (
            "ca.key",
            "ca.pem",
            "server.key",
            "server.pem",
            "client.key",
            "client.pem",
            "other-ca.key",
            "other-ca.pem",
        )
    }

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    for ca in ("ca", "other-ca"):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=nnrouter test {ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
        )
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}.key", "-out", f"{who}.csr"
        )
        (folder / f"{who}.ext").write_text(ext + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{who}.ext",
            "-out",
            f"{who}.pem",
        )
    return f


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server in a temp folder; yields a URL prefix without a database name."""
    pg_bin, base = init_pg_cluster()
    data, sock = base / "data", base / "sock"
    port = peers.free_port()
    proc = subprocess.Popen(
        _as_postgres(
            [
                str(pg_bin / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(sock),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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


def connect_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from another loopback address, as from another host."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def rss_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (VmRSS) and at its peak (VmHWM), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# --- the fault and fuzz suite (tests/faults/) -----------------------------------
#
# A fault test records its figures with ``figures.add(fault, cases=...,
# acknowledged=..., stored=..., lost=..., duplicated=..., recovery_s=...)`` (any
# keys); the session ends with one table of them, also written to
# ``$NNROUTER_FAULT_FIGURES`` (JSON lines) when that is set, for the README.
# The rows travel in the test's report (user_properties), so that they reach
# the session's table from pytest-xdist's worker processes too.

_FIGURES: list[dict[str, Any]] = []


class Figures:
    def __init__(self, node: pytest.Item):
        self.node = node

    def add(self, fault: str, **numbers: Any) -> None:
        row = {"fault": fault, "test": self.node.name, **numbers}
        self.node.user_properties.append(("figures", row))
        print(f"FIGURE {json.dumps(row)}")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _FIGURES.extend(row for key, row in report.user_properties if key == "figures")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not _FIGURES:
        return
    terminalreporter.section("fault and fuzz figures")
    for row in _FIGURES:
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("fault", "test"))
        terminalreporter.write_line(f"{row['fault']}: {rest}")
    out = os.environ.get("NNROUTER_FAULT_FIGURES")
    if out:
        with open(out, "a") as f:
            for row in _FIGURES:
                f.write(json.dumps(row) + "\n")


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies count as gone), from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out
