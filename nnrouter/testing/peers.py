"""Drive real DICOM peers (DCMTK) and nnrouter itself as child processes.

Benchmarks compare nnrouter with DCMTK on the same files in the same run, and
the tests talk to nnrouter only through real peers on loopback. Both need the
same plumbing: free ports, a storescu that proposes each file's own transfer
syntax, a storescp that accepts everything, and an ``nnrouter serve`` in a
folder of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def terminate(proc: subprocess.Popen | None, wait: float = 15) -> None:
    """Stop a peer politely (SIGTERM), then for sure (SIGKILL) if it has not gone within ``wait`` s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def storescu_config(files: list[Path], path: Path) -> tuple[Path, str]:
    """A storescu profile proposing, per SOP class, each file's own syntax first.

    DCMTK's storescu by default proposes only uncompressed syntaxes and would
    have to decompress a JPEG 2000 file to send it; a receiver must get the
    bytes as the modality encoded them.
    """
    pairs: dict[str, list[str]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True, force=True)
        sop = str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        tss = pairs.setdefault(sop, [])
        for t in ([ts] if ts else []) + UNCOMPRESSED:
            if t not in tss:
                tss.append(t)
    lines = ["[[TransferSyntaxes]]"]
    names: dict[str, str] = {}
    for tss in pairs.values():
        for t in tss:
            if t not in names:
                names[t] = f"TS{len(names)}"
                lines += [f"[{names[t]}]", f"TransferSyntax1 = {t}"]
    lines += ["[[PresentationContexts]]", "[All]"]
    n = 0
    for sop, tss in pairs.items():
        for t in tss:
            n += 1
            lines.append(f"PresentationContext{n} = {sop}\\{names[t]}")
    if n > 128:
        raise ValueError(f"{n} presentation contexts needed; 128 is the limit")
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = All"]
    path.write_text("\n".join(lines) + "\n")
    return path, "Files"


def storescu(
    port: int,
    files: list[Path],
    *,
    aec: str = "NNROUTER",
    aet: str = "STORESCU",
    config: tuple[Path, str] | None = None,
    extra: list[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Send files on one association with DCMTK storescu (verbose output)."""
    args = ["storescu", "-v", "-aet", aet, "-aec", aec]
    if config is not None:
        args += ["-xf", str(config[0]), config[1]]
    args += (extra or []) + ["127.0.0.1", str(port)] + [str(f) for f in files]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@dataclass
class StoreSCP:
    """DCMTK storescp writing into ``folder``; every transfer syntax, or (accept_all False) uncompressed only."""

    folder: Path
    aet: str = "STORESCP"
    port: int = field(default_factory=free_port)
    accept_all: bool = True
    proc: subprocess.Popen | None = None

    def start(self, extra: list[str] | None = None) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "storescp",
                *(["+xa"] if self.accept_all else []),
                "-aet",
                self.aet,
                "-od",
                str(self.folder),
                *(extra or []),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        terminate(self.proc)


@dataclass
class Node:
    """An ``nnrouter serve`` process in a folder of its own, on a free port."""

    home: Path
    database_url: str | None = None
    ae_title: str = "NNROUTER"
    port: int = field(default_factory=free_port)
    settings: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.home / "nnrouter.yaml"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'nnrouter.db'}"

    @property
    def log_path(self) -> Path:
        return self.home / "serve.log"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    def write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": self.ae_title, "port": self.port, "bind": "127.0.0.1"},
            "storage": {"path": str(self.spool), "min_free_mb": 50, "derived_path": str(self.home / "derived")},
            # Tests of the receive path look at rows before any worker does,
            # and choose their models themselves.
            "workers": {"count": 0},
            "models": {"classifier": None, "detector": None},
            "database": {"url": self.db_url},
            "logging": {"level": "info", "format": "json"},
            # The console is tested where a test asks for it (on a free port); elsewhere it would take 8042.
            "http": {"enabled": False},
        }
        for section, values in self.settings.items():
            cfg.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(cfg))
        return self.config_path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nnrouter", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self, upgrade: bool = True) -> Node:
        self.write_config()
        if upgrade:
            self.cli("db", "upgrade")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nnrouter", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        wait_port(self.port, proc=self.proc)
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        terminate(self.proc)
        return self.proc.returncode if self.proc else None

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []


def have(*tools: str) -> list[str]:
    """The tools from the list that are missing on this machine."""
    return [t for t in tools if shutil.which(t) is None]


@dataclass
class Orthanc:
    """A real PACS (Debian's Orthanc) in a folder of its own; REST on loopback only.

    ``modalities`` (name -> [AE title, host, port]) become its DicomModalities,
    the peers it may query or send to; ``config`` is merged into its
    configuration last.
    """

    home: Path
    aet: str = "ORTHANC"
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    modalities: dict | None = None
    config: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        import json

        self.home.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "nnrouter-test",
            "StorageDirectory": str(self.home / "db"),
            "IndexDirectory": str(self.home / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "Plugins": [],
            "StableAge": 1,
        }
        if self.modalities:
            cfg["DicomModalities"] = self.modalities
        cfg.update(self.config)
        (self.home / "orthanc.json").write_text(json.dumps(cfg))
        log = open(self.home / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.port, proc=self.proc)
        wait_port(self.http_port, proc=self.proc)
        return self

    def get(self, path: str):
        return self._call(path, None, 30)

    def post(self, path: str, body):
        """POST ``body`` as JSON (or bytes as given); the answer as JSON, or bytes."""
        import json

        return self._call(path, body if isinstance(body, bytes) else json.dumps(body).encode(), 60)

    def _call(self, path: str, data: bytes | None, timeout: float):
        """GET (no data) or POST to Orthanc's REST API; the answer as JSON, or bytes."""
        import json
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method="GET" if data is None else "POST"
        )
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            out = rsp.read()
        return json.loads(out) if rsp.headers.get_content_type() == "application/json" else out

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        terminate(self.proc)


def dciodvfy(path: Path) -> list[str]:
    """dicom3tools' verdict on a file we made: its error lines (warnings are not errors).

    dciodvfy checks the object against the IOD and module definitions of the
    standard; an empty list means it found nothing it calls an error.
    """
    res = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


@dataclass
class Wlmscpfs:
    """DCMTK's worklist SCP over a folder of .wl files, answering as ``aet``."""

    db: Path
    aet: str = "RISWL"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def folder(self) -> Path:
        """Where the .wl files go: wlmscpfs looks in a subfolder named after the called AE title."""
        return self.db / self.aet

    def start(self) -> Wlmscpfs:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "lockfile").touch()  # wlmscpfs locks it while searching; without it every query fails
        log = open(self.db / "wlmscpfs.log", "ab")
        # -csk: return the files' Specific Character Set, so UTF-8 names arrive as names.
        self.proc = subprocess.Popen(
            ["wlmscpfs", "-v", "-csk", "-dfp", str(self.db), str(self.port)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        terminate(self.proc)
