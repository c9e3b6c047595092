"""Benchmarks that print figures (nnrouter.testing.bench): ingest, inference, end to end, soak.

They print tables as they go, for a person watching; they take no ``--json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, add, group

# ../shared beside the checkout: the sample films the project's data lives in, when there.
_SHARED_GOOD = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "good"


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    return bench.ingest(
        count=args.count,
        rounds=args.rounds,
        rows=args.rows,
        columns=args.columns,
        workdir=args.workdir,
        console=args.console,
    )


def cmd_bench_console(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    return bench.console(args.studies, args.loads, args.workdir)


def cmd_bench_infer(args: argparse.Namespace) -> int:
    import importlib.resources

    from nnrouter.dicom.send import expand
    from nnrouter.testing import bench

    settings = common.settings(args)
    model = args.model or settings.models.classifier
    if model is None:
        return common.err("no model: pass --model DIR or set models.classifier", CONFIG)
    files = expand(args.files) if args.files else []
    if not files:
        data = importlib.resources.files("data_store") / "data"
        files = [Path(str(data / n)) for n in ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm")]
        files += sorted(_SHARED_GOOD.glob("*.dcm"))
    return bench.infer(model, files, args.batch, args.images, args.providers, settings.models.decode_max_side)


def cmd_bench_route(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    settings = common.settings(args)
    model = None if args.no_model else (args.model or settings.models.classifier)
    return bench.route(
        args.studies,
        args.images,
        args.rows,
        args.columns,
        args.workers,
        args.quiet_s,
        model,
        args.max_associations,
        args.workdir,
    )


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    interval = args.interval_s or (60.0 if seconds >= 300 else max(2.0, seconds / 6))
    warmup = args.warmup_s if args.warmup_s is not None else min(300.0, max(interval, seconds * 0.2))
    return bench.soak(
        seconds,
        senders=args.senders,
        per_association=args.per_association,
        rows=args.rows,
        columns=args.columns,
        workers=args.workers,
        model=args.model,
        interval_s=interval,
        warmup_s=warmup,
        workdir=args.workdir,
    )


def register(sub: Any) -> None:
    bench = group(sub, "bench", "benchmarks that print figures")
    ing = add(bench, "ingest", cmd_bench_ingest, "C-STORE throughput: nnrouter vs DCMTK storescp", config="none")
    ing.add_argument("--count", type=int, default=20, help="files per round")
    ing.add_argument("--rounds", type=int, default=3, help="alternating rounds per receiver")
    ing.add_argument("--rows", type=int, default=2500)
    ing.add_argument("--columns", type=int, default=2048)
    ing.add_argument("--workdir", type=Path, default=None, help="where to write files (default: a temp folder)")
    ing.add_argument(
        "--console",
        action="store_true",
        help="also serve the console; every other nnrouter round, a client loads the dashboard once a second",
    )
    con = add(bench, "console", cmd_bench_console, "console page loads with many studies in the store", config="none")
    con.add_argument("--studies", type=int, default=10000)
    con.add_argument("--loads", type=int, default=20, help="timed loads of each page")
    con.add_argument("--workdir", type=Path, default=None)
    inf = add(bench, "infer", cmd_bench_infer, "decode + preprocess + inference speed per stage")
    inf.add_argument("--model", type=Path, default=None, help="model folder (default: models.classifier)")
    inf.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    inf.add_argument("--images", type=int, default=64, help="images per batch size")
    inf.add_argument("--providers", nargs="+", default=None)
    inf.add_argument(
        "files", nargs="*", type=Path, help="DICOM files or folders (default: pydicom-data + ../shared good)"
    )
    rt = add(bench, "route", cmd_bench_route, "end to end: storescu -> nnrouter -> storescp vs direct")
    rt.add_argument("--studies", type=int, default=5)
    rt.add_argument("--images", type=int, default=4, help="images per study")
    rt.add_argument("--rows", type=int, default=2500)
    rt.add_argument("--columns", type=int, default=2048)
    rt.add_argument("--workers", type=int, default=2, help="classify worker processes")
    rt.add_argument("--quiet-s", type=float, default=1.0, help="the routing quiet period")
    rt.add_argument(
        "--max-associations", type=int, default=1, help="associations to the destination (storescp takes one at a time)"
    )
    rt.add_argument("--model", type=Path, default=None, help="classifier (default: models.classifier)")
    rt.add_argument("--no-model", action="store_true", help="route without classifying")
    rt.add_argument("--workdir", type=Path, default=None)
    sk = add(
        bench, "soak", cmd_bench_soak, "hours of small instances: RSS per process, images/s, counts", config="none"
    )
    sk_len = sk.add_mutually_exclusive_group()
    sk_len.add_argument("--minutes", type=float, default=30.0)
    sk_len.add_argument("--seconds", type=float, default=None, help="instead of --minutes (short runs, tests)")
    sk.add_argument("--senders", type=int, default=4, help="associations open at once")
    sk.add_argument("--per-association", type=int, default=10, help="instances sent on each association")
    sk.add_argument("--rows", type=int, default=128)
    sk.add_argument("--columns", type=int, default=128)
    sk.add_argument("--workers", type=int, default=1, help="decode/classify worker processes")
    sk.add_argument("--model", type=Path, default=None, help="classifier for the workers (default: none, decode only)")
    sk.add_argument("--interval-s", type=float, default=None, help="seconds between RSS lines (default 60)")
    sk.add_argument(
        "--warmup-s", type=float, default=None, help="RSS growth is measured from here (default 20 %%, at most 300 s)"
    )
    sk.add_argument("--workdir", type=Path, default=None)
