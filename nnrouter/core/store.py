"""The SQL store: what nnrouter knows, and the queue between its stages.

Every stage reads its input rows and writes its output rows here, so any
stage can be restarted or replayed alone. SQLite (WAL, synchronous=FULL) is
the embedded default for one machine; PostgreSQL is used when several nodes
share the work. The schema changes only through Alembic migrations
(``migrations/``); the service refuses to run on a database behind the head.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import ColumnElement


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(ts: dt.datetime) -> dt.datetime:
    """A stored time, aware: SQLite gives DateTime(timezone=True) back naive, and what it stores is UTC."""
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


UID = String(64)


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    # Header fields only; patient fields are stored (the PACS needs them back)
    # but never logged at info.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When the ordered-vs-performed check last ran (its flags are in `flag`).
    checked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When the worklist stage (nnrouter.orders.worklist_poll) last asked the RIS for this study's order,
    # or found it down; the router waits for it. NULL: not asked yet.
    worklist_asked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When to ask again (an empty answer, a failure); NULL: not again.
    worklist_next_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[str | None] = mapped_column(String(12))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class InstanceState:
    """States an instance moves through; each stage owns one transition.

    received -> classifying (claimed by a worker, with a lease) -> classified
    (or decoded, when no model is configured), or undecodable (the pixels
    cannot be decoded: the reason says why), or failed (inference kept
    failing after workers.max_attempts tries).
    """

    RECEIVED = "received"
    CLASSIFYING = "classifying"
    CLASSIFIED = "classified"
    DECODED = "decoded"
    UNDECODABLE = "undecodable"
    FAILED = "failed"
    # Made by nnrouter itself (the study's SR): never classified, forwarded where a rule asks.
    CREATED = "created"


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version", name="uq_instance_uid_version"),
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    # The same SOP Instance UID sent again with other content keeps both.
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24), default=InstanceState.RECEIVED, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    instance_number: Mapped[str | None] = mapped_column(String(12))
    view_position: Mapped[str | None] = mapped_column(String(16))
    image_laterality: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When the C-STORE request had arrived in full (migration 0011); received_at is after the fsync.
    request_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # Work-queue bookkeeping: who holds the instance, until when, how often tried.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The node whose spool holds the file (``node.name``); NULL: any node (rows from before nodes were named).
    node: Mapped[str | None] = mapped_column(String(64))
    # The data set without its pixels (nnrouter.core.headers): any node can read it, not only the one holding the file.
    header: Mapped[bytes | None] = mapped_column(LargeBinary)

    series: Mapped[Series] = relationship(back_populates="instances")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="instance", order_by="Prediction.id")
    detections: Mapped[list[Detection]] = relationship(back_populates="instance", order_by="Detection.id")


class Prediction(Base):
    """What the view classifier said about one instance."""

    __tablename__ = "prediction"
    __table_args__ = (UniqueConstraint("instance_id", "model_name", "model_version", name="uq_prediction_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str] = mapped_column(String(48))
    # The top class, or "unknown" below the model's calibrated threshold.
    label: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(Float)
    top5: Mapped[list] = mapped_column(JSON)  # [[label, score], ...] best first
    # Distance from the training data in feature space (None: the model has no such output).
    ood: Mapped[float | None] = mapped_column(Float)
    decode_ms: Mapped[float] = mapped_column(Float)
    preprocess_ms: Mapped[float] = mapped_column(Float)
    infer_ms: Mapped[float] = mapped_column(Float)
    cam_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="predictions")


class RoutingDecision(Base):
    """What the rules decided for a study, and why: one row per study."""

    __tablename__ = "routing_decision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), unique=True)
    decided_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rules_digest: Mapped[str] = mapped_column(String(64))
    outcomes: Mapped[list] = mapped_column(JSON)  # [{rule, matched, why}]
    deliveries: Mapped[list] = mapped_column(JSON)  # [{destination, rule, coerce}]
    hold: Mapped[bool] = mapped_column(Boolean, default=False)
    discard: Mapped[bool] = mapped_column(Boolean, default=False)


class OutboxState:
    """pending -> sending -> sent | failed (retried later) -> dead; held waits for a person."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"
    HELD = "held"


class Outbox(Base):
    """One delivery: an instance to a destination. Sent at least once, recorded once."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("instance_id", "destination", name="uq_outbox_instance_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(128))
    coerce: Mapped[dict | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))  # as sent
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    instance: Mapped[Instance] = relationship()


class RulesLoad(Base):
    """Each attempt to load an admin-edited file: what is running, and what was refused and why."""

    __tablename__ = "rules_load"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # "rules" (routing rules) or "procedures" (rules/procedures.yaml)
    kind: Mapped[str] = mapped_column(String(16), default="rules", server_default="rules")
    path: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    errors: Mapped[str | None] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The node whose router loaded it, and the text of a version that loaded (migration 0010): the
    # forwarder delivers with the destinations of the version the router decided with, not with its own
    # read of the file, which may be of a later, refused edit.
    node: Mapped[str | None] = mapped_column(String(64))
    text: Mapped[str | None] = mapped_column(Text)


class Detection(Base):
    """One region the detector found in one instance."""

    __tablename__ = "detection"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(32), index=True)
    score: Mapped[float] = mapped_column(Float)
    # Box in pixels of the original image: x1, y1, x2, y2 (column, row).
    box_px: Mapped[list] = mapped_column(JSON)
    # The same box in millimetres on the detector plane, when the pixel spacing is known.
    box_mm: Mapped[list | None] = mapped_column(JSON)
    # Corners in patient coordinates (mm), for CT localizers with position and orientation.
    corners_patient: Mapped[list | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="detections")


class OrderRequest(Base):
    """An order (requested procedure) from the images, a worklist or HL7; see ``nnrouter.orders.order``.

    ``key`` makes a re-sent order an update, not a second order: the source,
    accession number and requested procedure (or placer order) number.
    Patient fields are kept for linking and never logged.
    """

    __tablename__ = "order_request"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(64))
    placer_order_number: Mapped[str | None] = mapped_column(String(64))
    filler_order_number: Mapped[str | None] = mapped_column(String(64))
    codes: Mapped[list] = mapped_column(JSON)  # [[value, scheme, meaning], ...]
    description: Mapped[str | None] = mapped_column(String(256))
    laterality: Mapped[str | None] = mapped_column(String(1))
    modality: Mapped[str | None] = mapped_column(String(16))
    control: Mapped[str] = mapped_column(String(4), default="NW")  # CA: cancelled
    scheduled_at: Mapped[str | None] = mapped_column(String(32))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Flag(Base):
    """One finding of the ordered-vs-performed check; a study's flags are replaced on each check."""

    __tablename__ = "flag"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    severity: Mapped[str] = mapped_column(String(8))  # info | warning | error
    reason: Mapped[str] = mapped_column(Text)
    # The evidence: which instance, what the model said, what was expected.
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    evidence: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship()


class FlagReview(Base):
    """A person's word on a flag: acknowledged (seen) or resolved (with a comment).

    Flags are replaced on every order check; a review is kept by study, kind
    and instance, with a digest of what the flag said, so it still applies to
    the same finding after a re-check and not to a different one (a second
    view missing). A resolved flag no longer counts as a mismatch for the
    rules, so it stops holding the study.
    """

    __tablename__ = "flag_review"
    __table_args__ = (UniqueConstraint("study_id", "kind", "sop_instance_uid", name="uq_flag_review"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    # "" for a flag about the whole study (NULLs would not be unique).
    sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    state: Mapped[str] = mapped_column(String(16))  # acknowledged | resolved
    # The finding reviewed (orders.reviews.finding_digest): a re-check that finds something else reopens it.
    finding: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    by: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsoleUser(Base):
    """Someone who may log in to the console: a viewer sees, an admin also changes things."""

    __tablename__ = "console_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | admin
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, with its salt and parameters
    # sha256 of the user's API token (Authorization: Bearer); the token itself is shown once.
    token_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsoleSession(Base):
    """One login: the cookie carries its token, the store its digest, so a logout or a disabled user ends it
    everywhere at once (a copied cookie included)."""

    __tablename__ = "console_session"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    address: Mapped[str | None] = mapped_column(String(64))


class ConsoleSecret(Base):
    """The key that signs session cookies: one per store, so every node's console accepts the same login."""

    __tablename__ = "console_secret"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Audit(Base):
    """Who did what, when, and how it went: console and API changes, logins, DICOM associations and queries.

    ``detail`` never carries patient names or IDs: UIDs, accession numbers,
    AE titles, counts and reasons.
    """

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(16))  # console | api | cli | dicom
    actor: Mapped[str] = mapped_column(String(64), index=True)  # user name, or the calling AE title
    address: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(48), index=True)
    target: Mapped[str | None] = mapped_column(String(256))
    result: Mapped[str] = mapped_column(String(16))  # ok | refused | failed
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    node: Mapped[str | None] = mapped_column(String(64))


class RulesVersion(Base):
    """A version of the rule or procedures file saved from the console: who, when, the text and the diff."""

    __tablename__ = "rules_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # rules | procedures
    path: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    diff: Mapped[str] = mapped_column(Text)  # unified diff against the text it replaced
    saved_by: Mapped[str] = mapped_column(String(64))
    saved_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    restored_from: Mapped[int | None] = mapped_column(Integer)  # the version this one brought back
    comment: Mapped[str | None] = mapped_column(Text)


class DestinationPause(Base):
    """A destination an admin paused: the forwarder sends it nothing until it is resumed."""

    __tablename__ = "destination_pause"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    by: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StageBeat(Base):
    """The supervisor's word that a stage is alive: refreshed every few seconds while it runs."""

    __tablename__ = "stage_beat"

    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    pid: Mapped[int | None] = mapped_column(Integer)
    alive: Mapped[bool] = mapped_column(Boolean)
    beat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# --- engine and sessions ----------------------------------------------------


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed row survives power loss, not only a crash; the C-STORE
    # success status depends on it.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """The engine, a session factory and the write discipline for its dialect.

    SQLite allows one writer at a time; rather than let threads collide into
    "database is locked", writers on SQLite take ``write_lock``. PostgreSQL
    needs no such lock (rows are claimed with SKIP LOCKED).
    """

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            db_path = url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            # hide_parameters: a failed statement's message must not carry patient names into the log.
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, hide_parameters=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock() if self.is_sqlite else None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session for a unit of writes: committed on success, rolled back on error."""
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            with self.sessions() as session, session.begin():
                yield session
        finally:
            if lock is not None:
                lock.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    # --- migrations ---

    def _alembic(self) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(migrations_dir()))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self) -> str:
        """Bring the schema to the newest migration; returns the head revision."""
        cfg = self._alembic()
        command.upgrade(cfg, "head")
        return self.head_revision()

    def head_revision(self) -> str:
        return ScriptDirectory.from_config(self._alembic()).get_current_head() or ""

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def require_current(self) -> None:
        """Refuse to run on a schema that is not at the migration head."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"database schema is at {current or 'nothing (empty database)'}, "
                f"nnrouter needs {head}: run `nnrouter db upgrade` first"
            )

    # --- small queries used by the CLI ---

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        with self.read() as s:
            rows = s.execute(
                select(Outbox.destination, Outbox.state, func.count()).group_by(Outbox.destination, Outbox.state)
            ).all()
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in rows:
            out.setdefault(dest, {})[state] = n
        return out

    def rules_status(self, kind: str = "rules") -> dict:
        """The file of this kind running now, and a refused newer version if there is one."""
        with self.read() as s:
            mine = select(RulesLoad).where(RulesLoad.kind == kind)
            ok = s.execute(
                mine.where(RulesLoad.ok.is_(True)).order_by(RulesLoad.id.desc()).limit(1)
            ).scalar_one_or_none()
            bad = s.execute(
                mine.where(RulesLoad.ok.is_(False)).order_by(RulesLoad.id.desc()).limit(1)
            ).scalar_one_or_none()
        out: dict = {}
        if ok:
            out["running"] = {"path": ok.path, "digest": ok.digest, "at": ok.at}
        if bad and (ok is None or bad.id > ok.id):
            out["rejected"] = {"path": bad.path, "digest": bad.digest, "at": bad.at, "errors": bad.errors}
        return out

    def state_counts(self) -> dict[str, int]:
        with self.read() as s:
            rows = s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
        return dict(rows)


def claimant_prefix(node: str, pid: int) -> str:
    """The start of the ``claimed_by`` of every claimant in process ``pid`` of ``node``.

    Node names are unique among the nodes sharing a store; host names and
    pids are not (two containers can be host "nnrouter" and pid 7 both), so
    a dead process's claims are found by node and pid.
    """
    return f"{node[:48]}:{pid}:"  # with the pid and a random part, within claimed_by's 64


def new_claimant(node: str) -> str:
    """A ``claimed_by`` for one claiming queue in this process."""
    return f"{claimant_prefix(node, os.getpid())}{uuid.uuid4().hex[:6]}"


def held_here(node: str | None) -> ColumnElement[bool]:
    """Instances whose file this node can read: its own, and those no node is named for.

    ``node`` None (``storage.shared``: every node sees one spool) means all.
    Work that opens the file (classify, forward) claims only these; a node
    that took another's would find no file and fail the instance.
    """
    if node is None:
        return true()
    return or_(Instance.node == node, Instance.node.is_(None))


def latest_predictions(s: Session, instance_ids: Iterable[int]) -> dict[int, Prediction]:
    """What the classifier said last about each instance (a newer model's word wins), in one query."""
    ids = list(instance_ids)
    if not ids:
        return {}
    newest = select(func.max(Prediction.id)).where(Prediction.instance_id.in_(ids)).group_by(Prediction.instance_id)
    return {p.instance_id: p for p in s.execute(select(Prediction).where(Prediction.id.in_(newest))).scalars()}


def current_instances(s: Session, study_id: int, *, created: bool = False) -> list[Instance]:
    """The newest version of each SOP instance of a study, oldest first.

    A re-sent instance with other content keeps both versions on disk; the
    study is what the newest says. nnrouter's own objects (its SR) only when
    ``created`` is set.
    """
    newest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("version"))
        .join(Series)
        .where(Series.study_id == study_id)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    query = (
        select(Instance)
        .join(newest, (Instance.sop_instance_uid == newest.c.sop_instance_uid) & (Instance.version == newest.c.version))
        .join(Series)
        .where(Series.study_id == study_id)
        .order_by(Instance.id)
    )
    if not created:
        query = query.where(Instance.state != InstanceState.CREATED)
    return list(s.execute(query).scalars())


class SchemaOutOfDate(RuntimeError):
    pass


# SQLite primary result codes (the low byte of the extended code) that mean
# "not now" rather than "wrong": busy/locked, out of memory, read-only (a
# remount), I/O error, disk full, cannot open.
_SQLITE_PASSING = {
    5: "database busy",
    6: "database busy",
    7: "database out of resources",
    8: "database unavailable",
    10: "database unavailable",
    13: "database disk full",
    14: "database unavailable",
}


def unavailable(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is the database being down, full or busy; None otherwise.

    Such a failure is the site's trouble, not the instance's: the sender is to
    try again later (C-STORE 0xA700) and must not see the driver's text, which
    names hosts, files and SQL. Anything else (a bug, a missing table, a
    constraint) is not passing and gets None.
    """
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, PoolTimeout):
        return "database busy"
    if not isinstance(exc, DBAPIError):
        return None
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return _SQLITE_PASSING.get(code & 0xFF)
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    if sqlstate == "53100":  # disk_full
        return "database disk full"
    if sqlstate.startswith("53"):  # insufficient resources: memory, connections
        return "database out of resources"
    if sqlstate.startswith("40"):  # serialization failure, deadlock: try again
        return "database busy"
    if sqlstate.startswith(("08", "57P")) or exc.connection_invalidated:  # connection lost, server shutting down
        return "database unavailable"
    if not sqlstate and isinstance(exc, (OperationalError, InterfaceError)):  # could not connect at all
        return "database unavailable"
    return None


def migrations_dir() -> Path:
    """Alembic's folder: inside the wheel when installed, else the repo's."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("nnrouter's migrations folder is missing from this install")
