"""Benchmarks: commands that print figures beside a reference run.

Speed is measured, not asserted: each benchmark runs DCMTK on the same files
in the same invocation, alternating with nnrouter, and prints the ratio, so a
slow disk or a busy machine moves both numbers together.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from nnrouter.testing import peers, synthetic


def _send(port: int, files: list[Path], aec: str, cfg: tuple[Path, str]) -> float:
    t0 = time.perf_counter()
    res = peers.storescu(port, files, aec=aec, config=cfg, timeout=3600)
    elapsed = time.perf_counter() - t0
    acked = res.stderr.count("Received Store Response (Success)")
    if res.returncode != 0 or acked != len(files):
        raise RuntimeError(f"storescu to {aec} failed ({acked}/{len(files)} acknowledged):\n{res.stderr[-2000:]}")
    return elapsed


def _workdir(workdir: Path | None, prefix: str) -> tuple[Path | None, bool]:
    """Where a benchmark writes (a temp folder it owns unless given one); None when DCMTK is missing."""
    missing = peers.have("storescu", "storescp")
    if missing:
        print(f"missing DCMTK tools: {', '.join(missing)} (apt-get install dcmtk)")
        return None, False
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix=prefix)) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    return root, own


def ingest(count: int, rounds: int, rows: int, columns: int, workdir: Path | None, console: bool = False) -> int:
    """C-STORE throughput, DCMTK storescu -> {storescp, nnrouter}, alternating.

    ``console``: nnrouter also serves its console, and on every other of its
    rounds a logged-in client loads the dashboard once a second, so the
    figure with and without the console comes from the same run.
    """
    root, own = _workdir(workdir, "nnrouter-bench-")
    if root is None:
        return 2
    scp = node = None
    try:
        print(f"generating {rounds} x {count} DX files {rows}x{columns} 16-bit in {root} ...", flush=True)
        names = ["dcmtk", "nnrouter"] + (["nnrouter+dashboard"] if console else [])
        # Fresh UIDs for every send: a file sent twice would measure the duplicate path.
        sets = {
            name: [
                synthetic.write_series(root / f"in-{name}-{r}", count, rows=rows, columns=columns)
                for r in range(rounds)
            ]
            for name in names
        }
        size_mb = sum(f.stat().st_size for f in sets["dcmtk"][0]) / 1e6
        cfg = peers.storescu_config(sets["dcmtk"][0], root / "storescu.cfg")

        # Same largest PDU on both receivers, so the peer sends the same PDU sizes.
        scp = peers.StoreSCP(root / "storescp-out").start(["--max-pdu", "131072"])
        web_port = peers.free_port()
        settings: dict = {"logging": {"level": "warning"}}
        if console:
            settings["http"] = {"enabled": True, "bind": "127.0.0.1", "port": web_port}
        node = peers.Node(root / "nnrouter", settings=settings).start()
        refresher = _DashboardClient(node, web_port) if console else None
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = [(name, scp if name == "dcmtk" else None) for name in names]
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, peer in order:
                port, aec = (scp.port, scp.aet) if peer is not None else (node.port, node.ae_title)
                if refresher is not None and name == "nnrouter+dashboard":
                    refresher.start()
                try:
                    times[name].append(_send(port, sets[name][r], aec, cfg))
                finally:
                    if refresher is not None:
                        refresher.stop()
                print(f"round {r + 1}: {name:<18} {times[name][-1]:7.2f} s", flush=True)
            shutil.rmtree(scp.folder, ignore_errors=True)
            scp.folder.mkdir()

        print()
        print(f"{count} files a round, {size_mb / count:.1f} MB each, {rounds} rounds; median per round")
        rate = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rate[name] = count / med
            print(
                f"  {name:<18} {count / med:7.2f} images/s  {size_mb / med:8.1f} MB/s  (fsync: {'no, storescp does not' if name == 'dcmtk' else 'yes'})"
            )
        print(f"ratio nnrouter/dcmtk: {rate['nnrouter'] / rate['dcmtk']:.2f}")
        if refresher is not None:
            print(
                f"ratio nnrouter with a dashboard refresh every second / without: "
                f"{rate['nnrouter+dashboard'] / rate['nnrouter']:.3f} "
                f"({refresher.loads} dashboard loads, median {refresher.median_ms():.0f} ms)"
            )
        return 0
    finally:
        if node:
            node.stop()
        if scp:
            scp.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)


BENCH_USER = ("bench", "bench password only")


def _logged_in(port: int, timeout: float) -> Any:
    """An HTTP client logged in to the console on ``port`` as the benchmarks' viewer, as a browser does."""
    import httpx

    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout)
    token = http.get("/login").text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    name, password = BENCH_USER
    http.post("/login", data={"name": name, "password": password, "csrf": token})
    return http


class _DashboardClient:
    """A logged-in browser's worth of load: the dashboard page and its assets, once a second, while started."""

    def __init__(self, node: peers.Node, port: int, every_s: float = 1.0):

        from nnrouter.core.store import Store
        from nnrouter.web import users

        store = Store(node.db_url)
        users.add(store, BENCH_USER[0], "viewer", BENCH_USER[1], replace=True)
        store.dispose()
        peers.wait_port(port, timeout=60)
        self.http = _logged_in(port, timeout=30)
        self.every_s = every_s
        self.loads = 0
        self.ms: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def median_ms(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            for path in ("/", "/static/console.css", "/static/console.js"):
                r = self.http.get(path)
                if r.status_code != 200:
                    raise RuntimeError(f"dashboard load failed: {path} {r.status_code}")
            self.ms.append((time.perf_counter() - t0) * 1000)
            self.loads += 1
            self._stop.wait(max(0.0, self.every_s - (time.perf_counter() - t0)))


def console(studies: int, loads: int, workdir: Path | None) -> int:
    """Page loads of the console with ``studies`` studies in a fresh store, through `nnrouter web` over HTTP."""
    import subprocess
    import sys

    import yaml

    from nnrouter.core.store import Store
    from nnrouter.web import users

    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="nnrouter-bench-web-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        url = f"sqlite:///{root / 'bench.db'}"
        store = Store(url)
        store.upgrade()
        t0 = time.perf_counter()
        synthetic.fill_store(store, studies)
        print(f"{studies} studies written to the store in {time.perf_counter() - t0:.1f} s", flush=True)
        users.add(store, BENCH_USER[0], "viewer", BENCH_USER[1])
        store.dispose()
        port = peers.free_port()
        config = root / "nnrouter.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": {"url": url},
                    "storage": {"path": str(root / "spool")},
                    "models": {"classifier": None, "detector": None},
                    "http": {"port": port},
                    "logging": {"level": "warning", "format": "json"},
                }
            )
        )
        log = open(root / "web.log", "wb")  # noqa: SIM115 - the server's log, open for its life
        proc = subprocess.Popen(
            [sys.executable, "-m", "nnrouter", "web", "--config", str(config)], stdout=log, stderr=log
        )
        log.close()
        peers.wait_port(port, timeout=60, proc=proc)
        http = _logged_in(port, timeout=60)
        pages = {
            "GET /studies (first page of 50)": "/studies",
            "GET /studies?modality=DX&label=chest_pa_ap": "/studies?modality=DX&label=chest_pa_ap",
            "GET /api/studies": "/api/studies",
            "GET / (dashboard)": "/",
        }
        print(f"{loads} loads each, logged in, over loopback HTTP; the first load is not counted")
        print(f"  {'page':<44} {'median ms':>10} {'p95 ms':>8}  rows")
        for name, path in pages.items():
            r = http.get(path)
            if r.status_code != 200:
                raise RuntimeError(f"{path}: {r.status_code}")
            ms = []
            for _ in range(loads):
                t = time.perf_counter()
                r = http.get(path)
                ms.append((time.perf_counter() - t) * 1000)
            rows = (
                r.text.count("<tr>") - 1
                if "json" not in r.headers.get("content-type", "")
                else len(r.json()["studies"])
            )
            print(f"  {name:<44} {statistics.median(ms):10.1f} {_pct(ms, 95):8.1f}  {rows}")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def infer(
    model_dir: Path, files: list[Path], batches: list[int], images: int, providers: list[str] | None, max_side: int
) -> int:
    """Decode + preprocess + inference on real radiographs, per stage, at each batch size."""
    from nnrouter.pixels.decode import DecodeError, decode_file
    from nnrouter.pixels.runtime import Model

    model = Model.load(model_dir, providers=providers)
    usable = []
    for f in files:
        try:
            decode_file(f, max_side=max_side)
            usable.append(f)
        except DecodeError:
            continue
    if not usable:
        print("no decodable files")
        return 2
    print(
        f"model {model.card.name} {model.card.version} on {model.provider}; {len(usable)} distinct radiographs, "
        f"{images} images per batch size (files repeated), decode max side {max_side}"
    )
    print(
        f"{'batch':>5} {'images/s':>9}  {'decode p50/p95 ms/img':>22}  {'preprocess p50/p95 ms/batch':>28}  {'infer p50/p95 ms/batch':>23}"
    )
    for bs in batches:
        decode_ms: list[float] = []
        pre_ms: list[float] = []
        inf_ms: list[float] = []
        order = [usable[i % len(usable)] for i in range(images)]
        t_all = time.perf_counter()
        for start in range(0, len(order), bs):
            imgs = []
            for f in order[start : start + bs]:
                t0 = time.perf_counter()
                imgs.append(decode_file(f, max_side=max_side).image)
                decode_ms.append((time.perf_counter() - t0) * 1000)
            if model.card.task == "classify":
                model.classify(imgs)
            else:
                model.detect(imgs)
            assert model.timings is not None  # classify and detect set it
            pre_ms.append(model.timings.preprocess_ms)
            inf_ms.append(model.timings.infer_ms)
        rate = len(order) / (time.perf_counter() - t_all)
        print(
            f"{bs:>5} {rate:>9.1f}  {_pct(decode_ms, 50):>10.1f} / {_pct(decode_ms, 95):<9.1f}  "
            f"{_pct(pre_ms, 50):>13.1f} / {_pct(pre_ms, 95):<12.1f}  {_pct(inf_ms, 50):>10.1f} / {_pct(inf_ms, 95):<10.1f}"
        )
    print("reference: NNCPR reports 0.21 s for one image")
    return 0


def route(
    studies: int,
    images: int,
    rows: int,
    columns: int,
    workers: int,
    quiet_s: float,
    model: Path | None,
    max_associations: int,
    workdir: Path | None,
) -> int:
    """End to end: storescu -> nnrouter (keep, classify, route, forward) -> storescp, beside storescu -> storescp.

    Both runs send the same files to the same kind of receiver in the same
    invocation; the ratio is end-to-end images/s over direct images/s. The
    receipt-to-delivery times come from the store (instance received_at to
    outbox sent_at), so they include the quiet period that decides a study
    is complete.
    """
    from sqlalchemy import select

    from nnrouter.core.store import Instance, Outbox, OutboxState, Store

    root, own = _workdir(workdir, "nnrouter-bench-route-")
    if root is None:
        return 2
    direct = dest = node = None
    try:
        print(f"generating {studies} studies x {images} DX images {rows}x{columns} 16-bit in {root} ...", flush=True)
        files = [
            f
            for s in range(studies)
            for f in synthetic.write_series(root / "in" / f"s{s}", images, rows=rows, columns=columns)
        ]
        total = len(files)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        cfg = peers.storescu_config(files, root / "storescu.cfg")
        pdu = ["--max-pdu", "131072"]

        direct = peers.StoreSCP(root / "direct-out").start(pdu)
        t_direct = _send(direct.port, files, direct.aet, cfg)
        direct.stop()
        print(f"direct   storescu -> storescp: {t_direct:7.2f} s", flush=True)

        dest = peers.StoreSCP(root / "routed-out", aet="DEST").start(pdu)
        rules_file = root / "rules.yaml"
        rules_file.write_text(
            "settings:\n"
            f"  quiet_s: {quiet_s}\n"
            "destinations:\n"
            f"  - {{name: dest, ae_title: DEST, host: 127.0.0.1, port: {dest.port}, max_associations: {max_associations}}}\n"
            "rules:\n"
            "  - {name: everything, then: {forward: [dest]}}\n"
        )
        node = peers.Node(
            root / "nnrouter",
            settings={
                "logging": {"level": "warning"},
                "workers": {"count": workers},
                "models": {"classifier": str(model) if model else None},
                "routing": {"rules": str(rules_file), "tick_s": 0.2},
            },
        ).start()
        assert node.proc is not None  # start() launched it
        time.sleep(2)  # the workers load their model and warm up before the clock starts
        t0 = time.perf_counter()
        _send(node.port, files, node.ae_title, cfg)
        t_sent = time.perf_counter() - t0
        store = Store(node.db_url)
        try:
            deadline = time.monotonic() + 3600
            while True:
                with store.read() as s:
                    rows_ = s.execute(
                        select(Instance.received_at, Outbox.sent_at, Outbox.state).join(
                            Outbox, Outbox.instance_id == Instance.id
                        )
                    ).all()
                sent = [r for r in rows_ if r.state == OutboxState.SENT]
                dead = [r for r in rows_ if r.state == OutboxState.DEAD]
                if len(sent) >= total or dead or time.monotonic() > deadline or node.proc.poll() is not None:
                    break
                time.sleep(0.2)
            t_routed = time.perf_counter() - t0
        finally:
            store.dispose()
        if len(sent) < total:
            print(f"only {len(sent)}/{total} delivered ({len(dead)} dead); see {node.log_path}")
            return 1
        delays = [(r.sent_at - r.received_at).total_seconds() for r in sent]
        print(f"through nnrouter: all received in {t_sent:7.2f} s, all delivered in {t_routed:7.2f} s", flush=True)
        print()
        print(
            f"{studies} studies x {images} images, {size_mb / total:.1f} MB each; {workers} worker(s), "
            f"model {model or 'none'}, quiet period {quiet_s} s, {max_associations} association(s) to the destination"
        )
        print(f"  direct     {total / t_direct:7.2f} images/s  {size_mb / t_direct:8.1f} MB/s")
        print(
            f"  nnrouter   {total / t_routed:7.2f} images/s  {size_mb / t_routed:8.1f} MB/s  (end to end, fsync'd, classified, routed)"
        )
        print(
            f"  receipt -> delivery: p50 {_pct(delays, 50):.2f} s, p95 {_pct(delays, 95):.2f} s, max {max(delays):.2f} s"
        )
        print(f"ratio nnrouter/direct: {t_direct / t_routed:.2f}")
        return 0
    finally:
        for p in (node, dest, direct):
            if p:
                p.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)


# --- soak ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, oldest first (by start time)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) == pid:
            found.append((int(fields[19]), int(entry.name)))  # starttime, pid
    return [p for _, p in sorted(found)]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _roles(config_path: Path) -> list[str]:
    """The stage processes ``nnrouter serve`` starts for this config, in the order it starts them."""
    from nnrouter.core import config

    settings = config.load(config_path)
    roles = [f"worker-{i + 1}" for i in range(settings.workers.count)]
    if settings.routing.rules is not None or settings.orders.procedures is not None:
        roles.append("router")
    if getattr(getattr(settings, "retention", None), "enabled", False):
        roles.append("cleaner")
    return roles


def _processes(main_pid: int, roles: list[str]) -> dict[str, int]:
    """nnrouter's processes by role: main, then its children in start order; by pid when they do not match."""
    out = {"main": main_pid}
    kids = []
    for pid in _children(main_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "resource_tracker" in cmdline:
            out["resource_tracker"] = pid
        else:
            kids.append(pid)
    if len(kids) == len(roles):
        out.update(zip(roles, kids))
    else:  # a replaced process, or roles we did not expect: by pid
        out.update({f"child-{pid}": pid for pid in kids})
    return out


class _Senders:
    """Threads that each send ``per_association`` fresh instances per association, association after association."""

    def __init__(self, port: int, aec: str, threads: int, per_association: int, rows: int, columns: int):
        from pydicom.uid import ExplicitVRLittleEndian

        self.port, self.aec, self.per_association = port, aec, per_association
        self.template = synthetic.dx_dataset(synthetic.DXSpec(rows=rows, columns=columns))
        self.syntax = ExplicitVRLittleEndian
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked = self.failed = self.associations = self.refused = 0
        self.errors: dict[str, int] = {}
        self.unanswered: list[tuple[str, float, str]] = []  # (SOP Instance UID, seconds waited, how it ended)
        self.threads = [threading.Thread(target=self._run, name=f"soak-{i}", daemon=True) for i in range(threads)]

    def start(self) -> _Senders:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1

    def _run(self) -> None:
        import copy

        from pydicom.uid import generate_uid
        from pynetdicom import AE

        ds = copy.deepcopy(self.template)
        ae = AE(ae_title="SOAKSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(synthetic.DX_FOR_PRESENTATION, [self.syntax])
        while not self.stop.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aec)
            if not assoc.is_established:
                with self.lock:
                    self.refused += 1
                self._error("association not established")
                self.stop.wait(1)
                continue
            with self.lock:
                self.associations += 1
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            try:
                for n in range(self.per_association):
                    uid = generate_uid()
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
                    ds.InstanceNumber = n + 1
                    sent_at = time.monotonic()
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if "Status" in rsp else None
                    if status is None:  # what became of it: the store is asked at the end
                        with self.lock:
                            self.unanswered.append(
                                (
                                    uid,
                                    round(time.monotonic() - sent_at, 1),
                                    "aborted" if assoc.is_aborted else "timed out",
                                )
                            )
                    with self.lock:
                        if status == 0:
                            self.acked += 1
                        else:
                            self.failed += 1
                    if status != 0:
                        self._error("no response" if status is None else f"status 0x{status:04X}")
                        break
                    if self.stop.is_set():
                        break
            finally:
                if assoc.is_established:
                    assoc.release()


def _spool_files(root: Path) -> int:
    return sum(1 for f in root.rglob("*.dcm") if ".incoming" not in f.parts)


def soak(
    seconds: float,
    *,
    senders: int,
    per_association: int,
    rows: int,
    columns: int,
    workers: int,
    model: Path | None,
    interval_s: float,
    warmup_s: float,
    workdir: Path | None,
) -> int:
    """Small fresh instances over many associations for ``seconds``; RSS per process, rate, and the count check.

    What a router must not do over days: grow. RSS is sampled every
    ``interval_s`` from /proc for the main process, each worker and the
    router; growth of more than 10 % from the first sample after
    ``warmup_s`` to the last is a failure, and so is any difference between
    instances acknowledged, rows stored and files in the spool.
    """
    from sqlalchemy import func, select

    from nnrouter.core.store import Instance, Store

    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="nnrouter-soak-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    node = None
    senders_ = None
    failures: list[str] = []
    try:
        node = peers.Node(
            root / "nnrouter",
            settings={
                "logging": {"level": "warning"},
                "dicom": {"max_associations": max(10, senders * 2)},
                "workers": {"count": workers},
                "models": {"classifier": str(model) if model else None},
            },
        ).start()
        time.sleep(2)  # workers and router up before the clock starts
        print(
            f"soak: {seconds / 60:.1f} min, {senders} senders x {per_association} instances an association, "
            f"{rows}x{columns} 16-bit DX (fresh UIDs each), {workers} worker(s), model {model or 'none'}; "
            f"nnrouter in {node.home}",
            flush=True,
        )
        roles = _roles(node.config_path)
        senders_ = _Senders(node.port, node.ae_title, senders, per_association, rows, columns).start()
        t0 = time.monotonic()
        samples: list[tuple[float, int, dict[str, float]]] = []
        last_t, last_acked = t0, 0
        next_at = t0 + interval_s
        while True:
            now = time.monotonic()
            if node.proc is not None and node.proc.poll() is not None:
                failures.append(f"nnrouter exited with {node.proc.returncode}")
                break
            if now >= next_at or now - t0 >= seconds:
                acked = senders_.acked
                rss = {
                    role: r
                    for role, pid in _processes(node.proc.pid, roles).items()  # type: ignore[union-attr]
                    if role != "resource_tracker" and (r := _rss_mb(pid)) is not None
                }
                samples.append((now - t0, acked, rss))
                rate = (acked - last_acked) / max(now - last_t, 1e-9)
                mins, secs = divmod(int(now - t0), 60)
                print(
                    f"[{mins:3d}:{secs:02d}] {acked:7d} acknowledged ({rate:6.1f}/s), {senders_.failed} failed, "
                    f"{senders_.associations} associations; RSS MB: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()),
                    flush=True,
                )
                last_t, last_acked = now, acked
                next_at += interval_s
                if now - t0 >= seconds:
                    break
            time.sleep(min(1.0, max(0.05, next_at - time.monotonic())))
        senders_.join()
        elapsed = time.monotonic() - t0
        acked = senders_.acked
        # The last acknowledged instances are committed before their 0x0000 went out.
        store = Store(node.db_url)
        try:
            with store.read() as s:
                rows_stored = s.execute(select(func.count()).select_from(Instance)).scalar_one()
                lost_answers = senders_.unanswered
                kept = (
                    set(
                        s.execute(
                            select(Instance.sop_instance_uid).where(
                                Instance.sop_instance_uid.in_([u for u, _, _ in lost_answers[:100]])
                            )
                        ).scalars()
                    )
                    if lost_answers
                    else set()
                )
        finally:
            store.dispose()
        files = _spool_files(node.spool)

        print()
        print(
            f"{acked} instances acknowledged in {elapsed:.0f} s over {senders_.associations} associations: "
            f"{acked / elapsed:.1f} images/s; {senders_.failed} failed stores, {senders_.refused} refused associations"
            + (f" ({senders_.errors})" if senders_.errors else "")
        )
        for uid, waited, how in lost_answers[:10]:
            print(f"  no response to {uid} after {waited} s ({how}); {'stored' if uid in kept else 'not stored'}")
        same = acked == rows_stored == files
        print(
            f"counts: acknowledged {acked}, stored rows {rows_stored}, spool files {files}: {'OK' if same else 'MISMATCH'}"
        )
        if not same:
            failures.append(f"counts differ: acknowledged {acked}, stored rows {rows_stored}, spool files {files}")
        if senders_.failed:
            failures.append(f"{senders_.failed} stores not acknowledged: {senders_.errors}")
        base = next((s for s in samples if s[0] >= warmup_s), None)
        end = samples[-1] if samples else None
        if base is None or end is None or base is end:
            print(f"RSS: too short to judge growth (warm-up {warmup_s:.0f} s, {len(samples)} samples)")
        else:
            print(f"RSS growth from {base[0]:.0f} s (after warm-up) to {end[0]:.0f} s:")
            for role, before in base[2].items():
                after = end[2].get(role)
                if after is None:
                    print(f"  {role:<10} {before:7.1f} MB -> gone")
                    failures.append(f"process {role} gone")
                    continue
                growth = (after - before) / before * 100
                verdict = "OK" if growth <= 10 else "FAIL"
                print(f"  {role:<10} {before:7.1f} MB -> {after:7.1f} MB  {growth:+6.1f} %  {verdict}")
                if growth > 10:
                    failures.append(f"RSS of {role} grew {growth:.1f} % after warm-up ({before:.1f} -> {after:.1f} MB)")
        for f in failures:
            print(f"FAIL: {f}")
        if not failures:
            print("soak OK")
        return 1 if failures else 0
    finally:
        if senders_ is not None:
            senders_.stop.set()
        if node:
            node.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)
