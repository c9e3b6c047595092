"""Switch the configured classifier to a retrained one only when it is at least as good.

A hospital retrains on its own PACS and wants the new model in service, but
a model looks best on the images it was trained on, and a worse model in
service misroutes studies silently. So both models are measured on the same
images, ones neither was trained on, through the same evaluation the cards'
figures come from (:func:`nnrouter.training.evaluate.evaluate`, the ONNX runtime); the
candidate replaces the configured model only when its accuracy is not lower
and no class the current model covers loses more sensitivity than a stated
tolerance. Anything less is refused, with the figures that say why.

Held-out images are either the validation split both cards record
(``val_percent`` and ``seed`` of their training config: a file-name hash, the
same on every machine) or whole source groups (``--holdout-groups``). A
group is accepted only when the candidate was shown not to be trained on
it: by the groups its card lists as trained on, or by the manifest digest in
its provenance, which must be that of the training manifest given
(``--trained-on``) or else of the dataset without those groups.

The switch replaces the configured model directory in one rename (Linux
``renameat2(RENAME_EXCHANGE)``): a worker that opens the folder finds the old
model or the new one, whole, never a mix or nothing. The old one is kept as
``NAME.previous`` for :func:`rollback`. Workers notice the new card between
batches (:class:`nnrouter.pixels.watch.CardWatch`) and load it; no restart is needed.
"""

from __future__ import annotations

import csv
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nnrouter.pixels.modelcard import (
    ModelCard,
    ModelCardError,
    load_card,
    verify,
)

__all__ = [
    "Comparison",
    "Figures",
    "HeldOut",
    "PromotionError",
    "compare",
    "held_out",
    "install",
    "previous_dir",
    "promote",
    "rollback",
]

_DIGEST = re.compile(r"data manifest digest ([0-9a-f]{64})")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class PromotionError(ValueError):
    """The comparison or the switch cannot be done as asked (bad input, nothing held out, a failed swap)."""


# --------------------------------------------------------------------------
# Which images neither model was trained on


@dataclass(frozen=True)
class HeldOut:
    entries: list  # list[nnrouter.training.train.Entry]
    how: str  # in words, for the printed comparison
    not_compared: int  # dataset images of classes neither model claims
    notes: tuple[str, ...] = ()


def _split_of(card: ModelCard) -> tuple[int, int] | None:
    cfg = (card.metrics.get("training") or {}).get("config") or {}
    if "val_percent" not in cfg:
        return None
    return int(cfg["val_percent"]), int(cfg.get("seed", 0))


def trained_groups(card: ModelCard) -> set[str] | None:
    """The source groups the card says the model was fit on, when it records them."""
    groups = (card.metrics.get("training") or {}).get("groups")
    return set(groups) if groups is not None else None


def card_digest(card: ModelCard) -> str | None:
    """The digest of the manifest the model was trained on (see nnrouter.training.train.manifest_digest)."""
    recorded = (card.metrics.get("training") or {}).get("manifest_digest")
    if recorded:
        return str(recorded)
    found = _DIGEST.search(" ".join(card.provenance.split()))
    return found.group(1) if found else None


def held_out(
    entries: list,
    candidate: ModelCard,
    current: ModelCard,
    groups: list[str] | None = None,
    trained_on: list | None = None,
) -> HeldOut:
    """The dataset images that neither model was trained on, of the classes either claims.

    Raises PromotionError when there are none, when a named group is not in
    the dataset, or when the candidate's card does not show that it was kept
    off the named groups. ``trained_on`` (the training manifest's entries) is
    accepted as that proof when its digest is the one in the card.
    """
    from nnrouter.training.train import is_validation, manifest_digest

    claimed = set(candidate.labels) | set(current.labels)
    notes: list[str] = []
    if groups:
        present = {e.group for e in entries}
        unknown = [g for g in groups if g not in present]
        if unknown:
            raise PromotionError(
                f"no image of the dataset is in group(s) {', '.join(map(repr, unknown))}; "
                f"its groups are: {', '.join(map(repr, sorted(present)))}"
            )
        wanted = set(groups)
        trained = trained_groups(candidate)
        if trained is not None:
            overlap = sorted(trained & wanted)
            if overlap:
                raise PromotionError(
                    f"the candidate's card says it was trained on {', '.join(map(repr, overlap))}: "
                    "those images cannot show how it does on a source it never saw"
                )
        elif trained_on is not None:
            digest = card_digest(candidate)
            if manifest_digest(trained_on) != digest:
                raise PromotionError(
                    f"--trained-on is not the manifest the candidate was trained on: its digest is "
                    f"{manifest_digest(trained_on)[:16]}, the card's {(digest or 'none')[:16]}"
                )
            overlap = sorted({e.group for e in trained_on} & wanted)
            if overlap:
                raise PromotionError(
                    f"the candidate was trained on {', '.join(map(repr, overlap))} (its training "
                    "manifest): those images cannot show how it does on a source it never saw"
                )
        else:
            digest = card_digest(candidate)
            without = manifest_digest([e for e in entries if e.group not in wanted])
            if digest == manifest_digest(entries):
                raise PromotionError(
                    "the candidate was trained on this whole dataset (its card's manifest digest), "
                    f"groups {', '.join(map(repr, sorted(wanted)))} included"
                )
            if digest != without:
                raise PromotionError(
                    "the candidate's card does not show that it was kept off "
                    f"{', '.join(map(repr, sorted(wanted)))}: it lists no training groups, and its manifest digest "
                    f"({(digest or 'none')[:16]}) is not that of this dataset without them ({without[:16]}). Give its "
                    "training manifest (--trained-on), or compare on the validation split (no --holdout-groups)"
                )
        pool = [e for e in entries if e.group in wanted]
        how = f"source groups {', '.join(sorted(wanted))}, which the candidate was not trained on"
        if (trained_groups(current) or set()) & wanted:
            notes.append("the current model was trained on some of these groups: its figures are flattered")
    else:
        splits = {"candidate": _split_of(candidate), "current": _split_of(current)}
        if splits["candidate"] is None:
            raise PromotionError(
                "the candidate's card records no validation split (metrics.training.config): "
                "name held-out source groups with --holdout-groups"
            )
        known = [s for s in splits.values() if s is not None]
        pool = [e for e in entries if all(is_validation(e, pct, seed) for pct, seed in known)]
        parts = [f"{who} {s[0]} % seed {s[1]}" for who, s in splits.items() if s is not None]
        how = "the validation split both cards record (" + "; ".join(parts) + ")"
        if splits["current"] is None:
            notes.append("the current model's card records no validation split: it may have seen some of these images")
    chosen = [e for e in pool if e.label in claimed]
    if not chosen:
        raise PromotionError(
            f"nothing held out: no image of the dataset is in {how} and of a class either model "
            f"claims ({', '.join(sorted(claimed))})"
        )
    return HeldOut(chosen, how, len(pool) - len(chosen), tuple(notes))


# --------------------------------------------------------------------------
# Measuring both models on the same images


@dataclass
class Figures:
    """One model on the held-out images: a class it does not claim counts as missed, never skipped."""

    path: Path
    name: str
    version: str
    sha256: str
    labels: list[str]
    images: int
    correct: int
    unknown: int
    hits: dict[str, int]  # per class of the held-out images
    counts: dict[str, int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.images if self.images else 0.0

    def sensitivity(self, label: str) -> float | None:
        n = self.counts.get(label, 0)
        return self.hits.get(label, 0) / n if n else None


def _figures(model_dir: Path, entries: list, log: Callable[[str], None]) -> Figures:
    """evaluate() on exactly ``entries``, turned into counts over all of them."""
    from nnrouter.training.evaluate import evaluate

    card = load_card(model_dir)
    with tempfile.TemporaryDirectory(prefix="nnrouter-promote-") as tmp:
        manifest = Path(tmp) / "held_out.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "label", "group", "kind"])
            w.writerows((e.file, e.label, e.group, e.kind) for e in entries)
        report = evaluate(model_dir, manifest, split="all", log=log)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.label] = counts.get(e.label, 0) + 1
    hits = {label: report.confusion[k][k] for k, label in enumerate(report.labels)}
    # The runtime's "unknown": over the claimed images (a rate in the report), and what the unclaimed were called.
    unknown = report.unknown
    unknown += sum(called.get("unknown", 0) for called in report.probes.values())
    return Figures(
        Path(model_dir),
        card.name,
        card.version,
        card.sha256,
        list(card.labels),
        len(entries),
        sum(hits.values()),
        unknown,
        hits,
        counts,
    )


@dataclass
class Comparison:
    held: HeldOut
    candidate: Figures
    current: Figures
    tolerance: float
    reasons: list[str] = field(default_factory=list)  # why the candidate is refused; empty: accepted

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def text(self) -> str:
        c, k = self.candidate, self.current

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        def diff(a: float | None, b: float | None) -> str:
            return "-" if a is None or b is None else f"{a - b:+.3f}"

        lines = [
            f"held out: {self.held.how}: {c.images} images"
            + (
                f" ({self.held.not_compared} of classes neither model claims left out)"
                if self.held.not_compared
                else ""
            ),
            f"candidate {c.name} {c.version} ({c.path}, sha256 {c.sha256[:12]})",
            f"current   {k.name} {k.version} ({k.path}, sha256 {k.sha256[:12]})",
            f"{'':<26}{'n':>5}{'candidate':>11}{'current':>10}{'difference':>12}",
            f"{'accuracy':<26}{c.images:>5}{c.accuracy:>11.3f}{k.accuracy:>10.3f}{c.accuracy - k.accuracy:>+12.3f}",
            (
                f"{'reported unknown':<26}{c.images:>5}{c.unknown_rate:>11.3f}{k.unknown_rate:>10.3f}"
                f"{c.unknown_rate - k.unknown_rate:>+12.3f}"
            ),
            "sensitivity per class:",
        ]
        for label in sorted(c.counts):
            sc, sk = c.sensitivity(label), k.sensitivity(label)
            mark = "" if label in k.labels else "  (not claimed by the current model)"
            mark = mark or ("" if label in c.labels else "  (not claimed by the candidate)")
            lines.append(f"  {label:<24}{c.counts[label]:>5}{pct(sc):>11}{pct(sk):>10}{diff(sc, sk):>12}{mark}")
        unmeasured = sorted(set(k.labels) - set(c.counts))
        if unmeasured:
            lines.append(f"  not compared (no held-out images): {', '.join(unmeasured)}")
        lines += [f"note: {n}" for n in self.held.notes]
        if self.accepted:
            lines.append(
                f"candidate is at least as good (accuracy not lower; no class of the current model loses more "
                f"than {self.tolerance:.3f} sensitivity)"
            )
        else:
            lines += [f"refused: {r}" for r in self.reasons]
        return "\n".join(lines)


def compare(
    candidate: Path,
    current: Path,
    dataset: Path,
    *,
    groups: list[str] | None = None,
    trained_on: Path | None = None,
    tolerance: float = 0.0,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Both models on the same held-out images, and whether the candidate may replace the current one."""
    from nnrouter.training.train import read_manifest

    if not 0.0 <= tolerance <= 1.0:
        raise PromotionError(f"tolerance must be between 0 and 1 (a share of sensitivity), not {tolerance}")
    try:
        cand_card, cur_card = load_card(candidate), load_card(current)
        verify(candidate)
        verify(current)
    except ModelCardError as exc:
        raise PromotionError(str(exc)) from None
    for who, card in (("candidate", cand_card), ("current model", cur_card)):
        if card.task != "classify":
            raise PromotionError(f"the {who} is a {card.task} model; only classifiers are compared here")
    entries = read_manifest(dataset)
    held = held_out(entries, cand_card, cur_card, groups, read_manifest(trained_on) if trained_on else None)
    cand = _figures(candidate, held.entries, log)
    cur = _figures(current, held.entries, log)
    reasons = []
    if cand.correct < cur.correct:
        reasons.append(
            f"accuracy {cand.accuracy:.3f} is lower than the current model's {cur.accuracy:.3f} "
            f"({cand.correct} vs {cur.correct} of {cand.images})"
        )
    for label in cur.labels:
        sc, sk = cand.sensitivity(label), cur.sensitivity(label)
        if sk is None:
            continue
        # Compared in counts: a float tolerance of 0 must not fail on rounding.
        if cand.hits.get(label, 0) < cur.hits[label] - tolerance * cand.counts[label] - 1e-9:
            reasons.append(
                f"{label}: sensitivity {sc:.3f} vs {sk:.3f} ({(sc or 0) - sk:+.3f}; tolerance {tolerance:.3f})"
            )
    return Comparison(held, cand, cur, tolerance, reasons)


# --------------------------------------------------------------------------
# The switch


def previous_dir(target: Path) -> Path:
    return target.with_name(target.name + ".previous")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step; True when the kernel did it atomically.

    Where renameat2 is missing (not Linux, or a file system without it) the
    swap is three renames, and a reader can miss the folder for an instant.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
    spare = a.with_name(a.name + ".swap")
    os.rename(b, spare)
    os.rename(a, b)
    os.rename(spare, a)
    return False


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One promotion or rollback at a time in a models folder (a lock on the folder itself, no lock file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PromotionError(f"another promotion or rollback is running in {folder}") from None
        yield
        os.fsync(fd)  # the renames themselves are durable before we say so
    finally:
        os.close(fd)


def _copy(src: Path, dest: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir():
            (dest / rel).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
            with open(dest / rel, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(dest, 0o755)  # mkdtemp made it private; models are for every worker to read


def install(candidate: Path, target: Path, *, log: Callable[[str], None] = print) -> str:
    """Put a copy of ``candidate`` at ``target`` in one swap, keep the old one as NAME.previous; return the sha256.

    The copy is verified before the swap and ``target`` after it; a target
    that does not verify as the candidate is swapped back.
    """
    candidate, target = Path(candidate).resolve(), Path(target).absolute()
    if candidate == target.resolve() or target.resolve() in candidate.parents:
        raise PromotionError(f"the candidate {candidate} is the configured model folder {target}")
    try:
        want = verify(candidate)
    except ModelCardError as exc:
        raise PromotionError(str(exc)) from None
    if not target.is_dir():
        raise PromotionError(f"{target}: no model folder to replace")
    parent = target.parent
    with _locked(parent):
        for stale in parent.glob(f".{target.name}.incoming-*"):  # left by a promotion that died
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=parent))
        try:
            _copy(candidate, staging)
            if verify(staging) != want:  # pragma: no cover - verify raises first
                raise PromotionError(f"{staging}: the copy does not verify")
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, ModelCardError):
                raise PromotionError(f"the copy in {staging} does not verify: {exc}") from None
            raise
        if not _exchange(staging, target):
            log(f"note: {parent} has no atomic directory swap; the folder was missing for an instant")
        # From here ``staging`` holds the old model: it is moved, never deleted.
        try:
            got = verify(target)
            if got != want:
                raise ModelCardError(f"{target}: sha256 {got} after the swap, the candidate's is {want}")
        except ModelCardError as exc:
            _exchange(staging, target)
            shutil.rmtree(staging, ignore_errors=True)  # the candidate's copy again
            raise PromotionError(f"swapped back: {exc}") from None
        previous = previous_dir(target)
        if previous.exists():
            shutil.rmtree(previous)
        os.rename(staging, previous)
    return want


def rollback(target: Path, *, log: Callable[[str], None] = print) -> str:
    """Swap NAME.previous back in; return its sha256. Run twice, it swaps the promoted model back."""
    target = Path(target).absolute()
    previous = previous_dir(target)
    if not previous.is_dir():
        raise PromotionError(f"{previous}: nothing to roll back to")
    try:
        want = verify(previous)
    except ModelCardError as exc:
        raise PromotionError(f"{previous} does not verify, not rolled back: {exc}") from None
    with _locked(target.parent):
        if not _exchange(previous, target):
            log(f"note: {target.parent} has no atomic directory swap; the folder was missing for an instant")
        try:
            got = verify(target)
        except ModelCardError as exc:
            _exchange(previous, target)
            raise PromotionError(f"swapped back: {exc}") from None
    if got != want:  # pragma: no cover - the swap moved exactly the verified folder
        raise PromotionError(f"{target}: sha256 {got} after the rollback, expected {want}")
    return got


def promote(
    candidate: Path,
    target: Path,
    dataset: Path,
    *,
    groups: list[str] | None = None,
    trained_on: Path | None = None,
    tolerance: float = 0.0,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Compare, print, and install the candidate when it is at least as good (not when ``dry_run``)."""
    if not Path(target).is_dir():
        raise PromotionError(f"{target}: no current model to compare with")
    comparison = compare(candidate, target, dataset, groups=groups, trained_on=trained_on, tolerance=tolerance, log=log)
    log(comparison.text())
    if comparison.accepted and not dry_run:
        sha = install(candidate, target, log=log)
        log(
            f"promoted: {target} is now {comparison.candidate.name} {comparison.candidate.version} (sha256 {sha}); "
            f"the previous model is in {previous_dir(Path(target))} (`nnrouter models promote --rollback`)"
        )
    return comparison


# --------------------------------------------------------------------------
# Workers: noticing a promoted model between batches
