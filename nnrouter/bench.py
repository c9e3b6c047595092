"""Benchmarks: commands that print figures beside a reference run.

Speed is measured, not asserted: each benchmark runs DCMTK on the same files
in the same invocation, alternating with nnrouter, and prints the ratio, so a
slow disk or a busy machine moves both numbers together.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nnrouter import peers, synthetic


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
    root = Path(tempfile.mkdtemp(prefix=prefix)) if own else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    return root, own


def ingest(count: int, rounds: int, rows: int, columns: int, workdir: Path | None) -> int:
    """C-STORE throughput, DCMTK storescu -> {storescp, nnrouter}, alternating."""
    root, own = _workdir(workdir, "nnrouter-bench-")
    if root is None:
        return 2
    scp = node = None
    try:
        print(f"generating {rounds} x {count} DX files {rows}x{columns} 16-bit in {root} ...", flush=True)
        sets = [synthetic.write_series(root / f"in{r}", count, rows=rows, columns=columns) for r in range(rounds)]
        size_mb = sum(f.stat().st_size for f in sets[0]) / 1e6
        cfg = peers.storescu_config(sets[0], root / "storescu.cfg")

        # Same largest PDU on both receivers, so the peer sends the same PDU sizes.
        scp = peers.StoreSCP(root / "storescp-out").start(["--max-pdu", "131072"])
        node = peers.Node(root / "nnrouter", settings={"logging": {"level": "warning"}}).start()
        times: dict[str, list[float]] = {"dcmtk": [], "nnrouter": []}
        for r, files in enumerate(sets):
            order = [("dcmtk", scp.port, scp.aet), ("nnrouter", node.port, node.ae_title)]
            if r % 2:
                order.reverse()
            for name, port, aec in order:
                times[name].append(_send(port, files, aec, cfg))
                print(f"round {r + 1}: {name:<9} {times[name][-1]:7.2f} s", flush=True)
            shutil.rmtree(scp.folder, ignore_errors=True)
            scp.folder.mkdir()

        print()
        print(f"{count} files a round, {size_mb / count:.1f} MB each, {rounds} rounds; median per round")
        rate = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rate[name] = count / med
            print(f"  {name:<9} {count / med:7.2f} images/s  {size_mb / med:8.1f} MB/s  (fsync: {'yes' if name == 'nnrouter' else 'no, storescp does not'})")
        print(f"ratio nnrouter/dcmtk: {rate['nnrouter'] / rate['dcmtk']:.2f}")
        return 0
    finally:
        if node:
            node.stop()
        if scp:
            scp.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def infer(model_dir: Path, files: list[Path], batches: list[int], images: int, providers: list[str] | None, max_side: int) -> int:
    """Decode + preprocess + inference on real radiographs, per stage, at each batch size."""
    from nnrouter.decode import DecodeError, decode_file
    from nnrouter.runtime import Model

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
    print(f"model {model.card.name} {model.card.version} on {model.provider}; {len(usable)} distinct radiographs, "
          f"{images} images per batch size (files repeated), decode max side {max_side}")
    print(f"{'batch':>5} {'images/s':>9}  {'decode p50/p95 ms/img':>22}  {'preprocess p50/p95 ms/batch':>28}  {'infer p50/p95 ms/batch':>23}")
    for bs in batches:
        decode_ms: list[float] = []
        pre_ms: list[float] = []
        inf_ms: list[float] = []
        order = [usable[i % len(usable)] for i in range(images)]
        t_all = time.perf_counter()
        for start in range(0, len(order), bs):
            imgs = []
            for f in order[start:start + bs]:
                t0 = time.perf_counter()
                imgs.append(decode_file(f, max_side=max_side).image)
                decode_ms.append((time.perf_counter() - t0) * 1000)
            if model.card.task == "classify":
                model.classify(imgs)
            else:
                model.detect(imgs)
            pre_ms.append(model.timings.preprocess_ms)
            inf_ms.append(model.timings.infer_ms)
        rate = len(order) / (time.perf_counter() - t_all)
        print(f"{bs:>5} {rate:>9.1f}  {_pct(decode_ms, 50):>10.1f} / {_pct(decode_ms, 95):<9.1f}  "
              f"{_pct(pre_ms, 50):>13.1f} / {_pct(pre_ms, 95):<12.1f}  {_pct(inf_ms, 50):>10.1f} / {_pct(inf_ms, 95):<10.1f}")
    print("reference: NNCPR reports 0.21 s for one image")
    return 0


def route(studies: int, images: int, rows: int, columns: int, workers: int, quiet_s: float, model: Path | None,
          max_associations: int, workdir: Path | None) -> int:
    """End to end: storescu -> nnrouter (keep, classify, route, forward) -> storescp, beside storescu -> storescp.

    Both runs send the same files to the same kind of receiver in the same
    invocation; the ratio is end-to-end images/s over direct images/s. The
    receipt-to-delivery times come from the store (instance received_at to
    outbox sent_at), so they include the quiet period that decides a study
    is complete.
    """
    from sqlalchemy import select

    from nnrouter.store import Instance, Outbox, OutboxState, Store

    root, own = _workdir(workdir, "nnrouter-bench-route-")
    if root is None:
        return 2
    direct = dest = node = None
    try:
        print(f"generating {studies} studies x {images} DX images {rows}x{columns} 16-bit in {root} ...", flush=True)
        files = [f for s in range(studies) for f in synthetic.write_series(root / "in" / f"s{s}", images, rows=rows, columns=columns)]
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
        node = peers.Node(root / "nnrouter", settings={
            "logging": {"level": "warning"},
            "workers": {"count": workers},
            "models": {"classifier": str(model) if model else None},
            "routing": {"rules": str(rules_file), "tick_s": 0.2},
        }).start()
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
                        select(Instance.received_at, Outbox.sent_at, Outbox.state).join(Outbox, Outbox.instance_id == Instance.id)
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
        print(f"{studies} studies x {images} images, {size_mb / total:.1f} MB each; {workers} worker(s), "
              f"model {model or 'none'}, quiet period {quiet_s} s, {max_associations} association(s) to the destination")
        print(f"  direct     {total / t_direct:7.2f} images/s  {size_mb / t_direct:8.1f} MB/s")
        print(f"  nnrouter   {total / t_routed:7.2f} images/s  {size_mb / t_routed:8.1f} MB/s  (end to end, fsync'd, classified, routed)")
        print(f"  receipt -> delivery: p50 {_pct(delays, 50):.2f} s, p95 {_pct(delays, 95):.2f} s, max {max(delays):.2f} s")
        print(f"ratio nnrouter/direct: {t_direct / t_routed:.2f}")
        return 0
    finally:
        for p in (node, dest, direct):
            if p:
                p.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)
