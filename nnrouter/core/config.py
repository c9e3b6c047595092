"""Configuration, read once at start-up and handed to each stage.

One YAML file, with environment variables on top (prefix ``NNROUTER_``, nested
keys joined by ``__``: ``NNROUTER_DICOM__PORT=104``), so a container or a
systemd drop-in can change one value without editing the file. Nothing else
in the package reads the environment or a config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from nnrouter.core import yamlfile


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def valid_ae_title(value: str) -> str:
    """An AE title as DICOM allows it (PS3.5 AE): used for our own, our peers' and the rule files' titles."""
    value = value.strip()
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("an AE title may not contain backslash or control characters")
    return value


class AllowedPeer(_Section):
    """A calling AE that may send to us, optionally only from one host."""

    ae_title: str
    host: str | None = None

    _check_ae = field_validator("ae_title")(valid_ae_title)


class MoveDestination(_Section):
    """Where a C-MOVE may send: the AE title a requester names, and where that AE listens."""

    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    _title = field_validator("ae_title")(valid_ae_title)


class DicomTls(_Section):
    """Inbound DICOM over TLS: our certificate, and the CA that signs the peers' (if we check them)."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> DicomTls:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs `ca` (the authority that signs the peers' certificates)")
        return self


class Dicom(_Section):
    ae_title: str = "NNROUTER"
    port: int = Field(11112, ge=1, le=65535)
    bind: str = "0.0.0.0"
    allowed_calling_aes: list[AllowedPeer] = []
    max_associations: int = Field(10, ge=1)
    max_pdu: int = Field(131072, ge=0, description="0 means no limit")
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    # Connection-level defences (nnrouter.dicom.netguard), before any AE title check.
    first_pdu_timeout_s: float = Field(10, gt=0)
    pdu_timeout_s: float = Field(30, gt=0)
    max_associate_pdu: int = Field(65536, ge=1024)
    max_connections_per_host: int = Field(8, ge=0, description="0 means no cap")
    max_pending_connections: int = Field(32, ge=1)
    tls: DicomTls | None = None
    # Who may C-FIND (the Q/R models and Hanging Protocols); empty: nobody.
    query_aes: list[AllowedPeer] = []
    # The AE titles a C-MOVE may send to (the peers of query_aes retrieve; anyone else is refused).
    move_destinations: list[MoveDestination] = []

    _check_ae = field_validator("ae_title")(valid_ae_title)


class Storage(_Section):
    path: Path = Path("var/spool")
    min_free_mb: int = Field(1024, ge=0)
    # What nnrouter makes from the images (class activation map overlays).
    derived_path: Path = Path("var/derived")
    # Every node sees the same spool (one shared file system): any node may
    # work on any instance. false: a node works only on what it holds.
    shared: bool = False


def _host_name(value: str | None = None) -> str:
    """This machine's host name where no node name is given."""
    import socket

    return socket.gethostname() if value is None else value


class Node(_Section):
    """Which node this is: every instance row names the node whose spool holds its file.

    Nodes on one database each classify and forward only what they hold
    (unless ``storage.shared``); rows from before nodes were named (NULL)
    belong to any node, as they did on a single machine.
    """

    name: str = Field(default_factory=_host_name, min_length=1, max_length=64)

    _default = field_validator("name", mode="before")(_host_name)

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("a node name may not have spaces at its ends or control characters")
        return value


class Workers(_Section):
    count: int = Field(1, ge=0)
    batch_size: int = Field(16, ge=1)
    max_wait_ms: int = Field(200, ge=0)
    lease_s: float = Field(300, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_ms: int = Field(500, ge=10)


# Where the default models/ and rules/ are when not where nnrouter runs: the
# checkout (an editable install), then the copy the wheel carries beside the
# package (pyproject.toml's force-include puts them in nnrouter/_shipped).
_CHECKOUT = Path(__file__).resolve().parents[2]
_PACKAGE_DATA = Path(__file__).resolve().parents[1] / "_shipped"


def shipped_path(value: Path) -> Path:
    """A relative path (a model, rules/procedures.yaml) where we run, else in the checkout, else in the wheel's copy.

    Where we run comes first so that a site's own file of the same name wins;
    a path found nowhere is returned as given, for the reader's own message.
    """
    if value.is_absolute() or value.exists():
        return value
    for root in (_CHECKOUT, _PACKAGE_DATA):
        if (root / value).exists():
            return root / value
    return value


def _shipped(value: Path | None) -> Path | None:
    return None if value is None else shipped_path(value)


class Models(_Section):
    # validate_default: the defaults are looked up too (_shipped), not only the paths a config names.
    classifier: Path | None = Field(Path("models/nnrouter-view"), validate_default=True)
    detector: Path | None = Field(Path("models/nnrouter-regions"), validate_default=True)

    _find = field_validator("classifier", "detector")(_shipped)
    providers: list[str] | None = None
    intra_op_threads: int = Field(0, ge=0)
    decode_max_side: int = Field(1024, ge=64)


class Routing(_Section):
    # The routing rule file; null: nothing is forwarded.
    rules: Path | None = None
    # How often the router looks for complete studies and the forwarder for work.
    tick_s: float = Field(1.0, gt=0)
    # An idle association to a destination is released after this long.
    idle_close_s: float = Field(10.0, gt=0)
    # A delivery in flight when its forwarder died is retried after this long.
    lease_s: float = Field(120.0, gt=0)


class Worklist(_Section):
    """A Modality Worklist SCP, asked for the order of each study by accession number."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: str
    calling_ae: str | None = None  # who we say we are to the worklist; null: dicom.ae_title
    timeout_s: float = Field(10.0, gt=0)

    _check_ae = field_validator("ae_title", "calling_ae")(lambda v: None if v is None else valid_ae_title(v))


class Hl7(_Section):
    """The HL7 v2 (ORM^O01, OMI^O23) listener over MLLP.

    Its orders win over what the images say, so it has its own allow list
    (by peer address; empty: loopback only) and caps that keep a peer which
    opens connections, or trickles bytes, from locking the RIS out.
    """

    bind: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535)
    allowed_hosts: list[str] = []
    max_connections: int = Field(20, ge=1)
    max_connections_per_host: int = Field(4, ge=1)
    idle_timeout_s: float = Field(300, gt=0)
    message_timeout_s: float = Field(30, gt=0)
    max_message_bytes: int = Field(1 << 20, ge=1024)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        import ipaddress
        import re

        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if not re.fullmatch(
                    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*",
                    host,
                ):
                    raise ValueError(f"{host!r} is not an address, a network (10.1.2.0/24) or a host name") from None
        return value


class Orders(_Section):
    # What each procedure expects (view classes and counts); null: no
    # ordered-vs-performed check, only header-vs-pixel flags.
    procedures: Path | None = Field(Path("rules/procedures.yaml"), validate_default=True)
    worklist: Worklist | None = None
    hl7: Hl7 | None = None

    _find = field_validator("procedures")(_shipped)


class Retention(_Section):
    """What the cleaner (``nnrouter.service.clean``) deletes, and when; see the EXAMPLE text for the rules."""

    enabled: bool = True
    # Days a study's files are kept after its last delivery was sent (and after its last image came).
    keep_days: float = Field(7, ge=0)
    # Overrides: the longest of those that apply to a study wins over keep_days.
    keep_days_by_destination: dict[str, float] = {}
    keep_days_by_calling_ae: dict[str, float] = {}
    # Studies forwarded nowhere (no rules, no rule matched, or discard): days after
    # the last image; null: never deleted (nnrouter holds the only copy).
    not_forwarded_keep_days: float | None = Field(None, ge=0)
    # Below this much free spool space, delivered studies go early, oldest first
    # (null: storage.min_free_mb + 1024).
    clean_below_free_mb: int | None = Field(None, ge=0)
    # Spool files without a row (a crash between write and commit) and overlays
    # without a prediction are removed once older than this.
    orphan_grace_s: float = Field(3600, gt=0)
    # Seconds between cleaning passes (more often while the spool is short of space).
    interval_s: float = Field(300, gt=0)

    @field_validator("keep_days_by_destination", "keep_days_by_calling_ae")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if v < 0]
        if bad:
            raise ValueError(f"days must be 0 or more (for {', '.join(bad)})")
        return value


class Limits(_Section):
    """Back-pressure (``nnrouter.service.pressure``): when new associations are refused, and when to alert."""

    # Below this much free spool space, associations that would store are refused
    # (A-ASSOCIATE-RJ, transient, local limit exceeded); null: storage.min_free_mb + 256.
    refuse_below_free_mb: int | None = Field(None, ge=0)
    # Instances waiting for the classifier (received or classifying); more: refused. null: no limit.
    max_unclassified: int | None = Field(50000, ge=1)
    # Deliveries not yet made (pending, sending, failed); more: refused. null: no limit.
    max_outbox_pending: int | None = Field(None, ge=1)
    # The oldest delivery not yet made older than this raises an alert (log, status, metric). null: off.
    outbox_alert_age_s: float | None = Field(3600, gt=0)
    # The checks are cached this long, so the receive path queries the store at most once per interval.
    check_every_s: float = Field(1.0, ge=0)


class Database(_Section):
    url: str = "sqlite:///var/nnrouter.db"


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: readable lines on a terminal, JSON lines otherwise (journald, files, log shippers).
    format: Literal["auto", "json", "console"] = "auto"


class HttpTls(_Section):
    """HTTPS served by nnrouter itself (Uvicorn with this certificate and key); null: plain HTTP."""

    cert: Path
    key: Path

    @model_validator(mode="after")
    def _files_exist(self) -> HttpTls:
        missing = [str(p) for p in (self.cert, self.key) if not p.is_file()]
        if missing:
            raise ValueError(f"no such file: {', '.join(missing)}")
        return self


class Http(_Section):
    """The console, REST API and metrics (``nnrouter.web``): a stage of ``serve``, or ``nnrouter web``."""

    enabled: bool = True
    # Loopback unless an admin says otherwise: the console is not on the LAN by default.
    bind: str = "127.0.0.1"
    port: int = Field(8042, ge=1, le=65535)
    # Pages and GET /api/ without a login (never the patient names and IDs, never a change).
    allow_anonymous_read: bool = False
    tls: HttpTls | None = None
    # Cookies only over HTTPS; null: when tls is set. Set true behind a TLS-terminating proxy.
    secure_cookies: bool | None = None
    session_hours: float = Field(12, gt=0)
    # Failed logins from one address or for one user name within the window, before refusing for the window.
    login_failures: int = Field(5, ge=1)
    login_window_s: float = Field(300, gt=0)
    # Reverse proxies whose X-Forwarded-For names the real client (its address is what logins are counted by).
    trusted_proxies: list[str] = []

    @property
    def cookies_secure(self) -> bool:
        return self.tls is not None if self.secure_cookies is None else self.secure_cookies


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NNROUTER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    dicom: Dicom = Dicom()
    node: Node = Node()
    storage: Storage = Storage()
    workers: Workers = Workers()
    models: Models = Field(default_factory=Models)  # made at load, so the defaults are looked up from where it runs
    routing: Routing = Routing()
    orders: Orders = Field(default_factory=Orders)
    database: Database = Database()
    logging: Logging = Logging()
    retention: Retention = Retention()
    limits: Limits = Limits()
    http: Http = Http()

    @property
    def files_of(self) -> str | None:
        """The node whose spool files this node can open: its own, or None (every node's) on a shared spool."""
        return None if self.storage.shared else self.node.name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: an operator's override is deliberate.
        return (env_settings, init_settings)


def load(path: Path | str | None = None) -> Settings:
    """Settings from a YAML file (or the embedded defaults) plus the environment.

    Raises yamlfile.FileProblems naming file, line, key and reason.
    """
    data: dict[str, Any]
    positions: yamlfile.Positions
    if path is None:
        data, positions, name = {}, {}, "(defaults)"
    else:
        data, positions = yamlfile.load_mapping(Path(path))
        name = str(path)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise yamlfile.FileProblems(yamlfile.problems_from(exc, name, positions)) from exc


EXAMPLE = """\
# nnrouter configuration. Every key is optional; shown here with its default.
# Any key can be overridden from the environment: NNROUTER_<SECTION>__<KEY>,
# e.g. NNROUTER_DICOM__PORT=104 or NNROUTER_DATABASE__URL=postgresql+psycopg://...

dicom:
  # Our AE title: modalities must call us by this name (else A-ASSOCIATE-RJ,
  # "called AE title not recognised").
  ae_title: NNROUTER
  port: 11112
  # Address to listen on; 127.0.0.1 to accept only local peers. 0.0.0.0 lets
  # the modalities on the LAN send; queries still need query_aes below.
  bind: 0.0.0.0
  # Who may send to us. Empty list = accept any calling AE title.
  # host (optional) pins an AE title to one peer address.
  allowed_calling_aes: []
  #  - ae_title: CR_ROOM1
  #    host: 10.1.2.3
  #  - ae_title: DX_ED
  # Associations served at once; more are rejected ("local limit exceeded").
  max_associations: 10
  # Largest PDU we accept, in bytes (0 = no limit).
  max_pdu: 131072
  # Seconds to wait for association negotiation, DIMSE messages, and network reads.
  acse_timeout_s: 30.0
  dimse_timeout_s: 60.0
  network_timeout_s: 60.0
  # Defences before any AE title check, against whoever reaches the port:
  # the TLS handshake and the whole A-ASSOCIATE-RQ must arrive within
  # first_pdu_timeout_s of the connect, and every later PDU within
  # pdu_timeout_s of its first byte (a trickle does not extend it); else
  # A-ABORT and the connection is closed.
  first_pdu_timeout_s: 10.0
  pdu_timeout_s: 30.0
  # Largest A-ASSOCIATE-RQ (and any PDU but P-DATA, which max_pdu caps), in
  # bytes; checked on the PDU header, before anything is buffered.
  max_associate_pdu: 65536
  # Connections open at once from one peer address (0 = no cap).
  max_connections_per_host: 8
  # Connections still waiting for their A-ASSOCIATE-RQ; they hold none of the
  # max_associations slots. When full, the oldest waiting one is closed.
  max_pending_connections: 32
  # DICOM over TLS for the peers that connect to us. null: plain TCP.
  tls: null
  #  cert: /etc/nnrouter/tls/server.pem
  #  key: /etc/nnrouter/tls/server.key
  #  # The authority that signs the modalities' certificates (optional).
  #  ca: /etc/nnrouter/tls/ca.pem
  #  # Refuse peers without a certificate signed by `ca`.
  #  require_client_cert: false
  # Who may query us (C-FIND: Study/Patient Root, Hanging Protocols), like
  # Orthanc's DicomAlwaysAllowFind: false. Empty list = nobody; anyone else is
  # answered 0x0124 (refused: not authorized). A querying AE must also pass
  # allowed_calling_aes. C-STORE is not affected.
  query_aes: []
  #  - ae_title: PACS
  #    host: 10.1.2.10
  # C-GET and C-MOVE (Patient and Study Root) are answered for the same peers
  # as C-FIND. A C-MOVE sends only to an AE title named here; any other is
  # refused with 0xA801 (Move Destination unknown).
  move_destinations: []
  #  - ae_title: PACS
  #    host: 10.1.2.10
  #    port: 104

node:
  # This node's name, recorded on every instance it receives: nodes sharing
  # one database classify and forward only the instances whose files their
  # own spool holds. null = this machine's host name. Keep it stable (a
  # container's host name changes when it is re-created): instances received
  # under an old name wait for a node of that name. Rows from before
  # nodes had names belong to any node.
  name: null

storage:
  # Spool folder for received instances (fsync'd before we acknowledge them).
  path: var/spool
  # Below this much free space, C-STORE answers 0xA700 (out of resources).
  min_free_mb: 1024
  # Class activation map overlays (PNG) that the workers make.
  derived_path: var/derived
  # true: every node sees this same spool (a shared file system), so any node
  # may classify and forward any instance. false: each node its own.
  shared: false

workers:
  # Worker processes that `nnrouter serve` starts to decode and classify
  # (0 = none; run `nnrouter worker` elsewhere instead).
  count: 1
  # Instances per inference batch, and how long to wait to fill one.
  batch_size: 16
  max_wait_ms: 200
  # A claimed instance returns to the queue if its worker dies: after this long.
  lease_s: 300.0
  # Inference failures before an instance is marked failed.
  max_attempts: 3
  # How often an idle worker looks for new instances.
  poll_ms: 500

models:
  # Folders with model.onnx + model.yaml (relative: where nnrouter runs, then
  # the models shipped with it). null: instances are only decoded.
  classifier: models/nnrouter-view
  # Region boxes (HEAD, SPINE; its card lists what it never predicts).
  detector: models/nnrouter-regions
  # onnxruntime execution providers in order of preference; null = CUDA when
  # an NVIDIA driver is loaded, then CPU.
  providers: null
  # CPU threads per inference session (0 = onnxruntime decides).
  intra_op_threads: 0
  # Decoded images are shrunk to this longest side before the model sees them.
  decode_max_side: 1024

routing:
  # Routing rules (YAML; see rules/examples/seed.yaml). null: nothing is forwarded.
  # A changed file is reloaded; one that fails validation never replaces the
  # running rules (the rejection is logged and shown by `nnrouter status`).
  rules: null
  # Seconds between looks for complete studies and for deliveries to make.
  tick_s: 1.0
  # Seconds before an idle association to a destination is released.
  idle_close_s: 10.0
  # Seconds before a delivery left in flight by a dead forwarder is retried.
  lease_s: 120.0

orders:
  # What each ordered procedure should produce (rules/procedures.yaml, edited
  # like the routing rules). null: no ordered-vs-performed check.
  procedures: rules/procedures.yaml
  # A Modality Worklist SCP to ask for each study's order by accession
  # number (C-FIND). null: orders come from the images and HL7 only.
  worklist: null
  #  host: ris.example
  #  port: 104
  #  ae_title: RIS_MWL
  #  calling_ae: null  # our AE title towards the worklist; null: dicom.ae_title
  #  timeout_s: 10
  # HL7 v2 ORM^O01 / OMI^O23 over MLLP: a listener that ACKs and keeps orders.
  # null: off.
  hl7: null
  #  bind: 0.0.0.0
  #  port: 2575
  #  # Who may send orders, by peer address: addresses, networks or host
  #  # names (resolved at start). Empty: loopback only (this machine).
  #  allowed_hosts: []
  #  #  - 10.1.2.3
  #  #  - 10.1.5.0/24
  #  # Connections at once, in all and from one host; more are closed at once.
  #  max_connections: 20
  #  max_connections_per_host: 4
  #  # Seconds a connection may stay silent before its next message, and
  #  # seconds from a message's first byte to its end (a peer that trickles
  #  # bytes is dropped).
  #  idle_timeout_s: 300
  #  message_timeout_s: 30
  #  # Larger messages are answered AR; the connection stays usable.
  #  max_message_bytes: 1048576

retention:
  # The cleaner deletes a study's files (spool and overlays) and its rows once
  # every delivery of the study is sent and keep_days have passed since the
  # last one was sent and the last image came. It never deletes a study with
  # a delivery pending, sending, failed, dead or held, one not yet routed, or
  # one with images not yet classified. Deleted studies no longer answer
  # C-FIND and are no longer priors. `nnrouter clean --dry-run` shows what
  # would go and why.
  enabled: true
  keep_days: 7
  # Per destination or calling AE title; the longest that applies wins.
  keep_days_by_destination: {}
  #  research_archive: 30
  keep_days_by_calling_ae: {}
  #  CR_ROOM1: 2
  # Studies forwarded nowhere (routing.rules null, no rule matched, discard):
  # days after the last image; null = never deleted (the only copy).
  not_forwarded_keep_days: null
  # Below this much free spool space (MB), delivered studies go before
  # keep_days, oldest first; undelivered ones never. null = min_free_mb + 1024.
  clean_below_free_mb: null
  # Seconds before a spool file without a row (a crash between write and
  # commit) or an overlay without a prediction is removed.
  orphan_grace_s: 3600
  # Seconds between cleaning passes (every 30 s while short of space).
  interval_s: 300

limits:
  # Back-pressure: associations that would store are refused (A-ASSOCIATE-RJ,
  # rejected-transient, "local limit exceeded"; the modality keeps its copy
  # and retries) while any limit is crossed; C-ECHO and C-FIND still work.
  # `nnrouter status` shows ready: false with the reasons.
  # Free spool space (MB) below which; null = storage.min_free_mb + 256.
  refuse_below_free_mb: null
  # Instances waiting for the classifier; null = no limit.
  max_unclassified: 50000
  # Deliveries not yet made (pending, sending, failed); null = no limit.
  max_outbox_pending: null
  # Alert (warning log, status, metric) when the oldest delivery not yet made
  # is older than this many seconds; null = no alert.
  outbox_alert_age_s: 3600
  # Seconds the checks are cached for (the receive path asks on every association).
  check_every_s: 1.0

database:
  # SQLite (embedded, one machine) or PostgreSQL (several nodes):
  #   postgresql+psycopg://nnrouter:secret@db.example/nnrouter
  url: sqlite:///var/nnrouter.db

logging:
  # debug | info | warning | error. Patient names, IDs and birth dates
  # are never logged at info.
  level: info
  # auto (console lines on a terminal, JSON lines otherwise) | json (one JSON
  # object a line, for journald / log shippers) | console
  format: auto

http:
  # The console, the REST API (/api/, OpenAPI at /api/openapi.json), /metrics,
  # /healthz and /readyz: a stage of `nnrouter serve`, or `nnrouter web` alone.
  enabled: true
  # Loopback by default: put the address of the LAN here (or a reverse proxy
  # in front) to reach it from elsewhere.
  bind: 127.0.0.1
  port: 8042
  # Pages and GET /api/ without a login: counts, rules, queues, models; never
  # patient names or IDs, and never a change.
  allow_anonymous_read: false
  # HTTPS served by nnrouter itself. null: plain HTTP (keep it on loopback,
  # or behind a TLS-terminating proxy with secure_cookies: true).
  tls: null
  #  cert: /etc/nnrouter/tls/console.pem
  #  key: /etc/nnrouter/tls/console.key
  # Session cookies only over HTTPS. null: when tls is set.
  secure_cookies: null
  # A login lasts this long.
  session_hours: 12
  # Failed logins, from one address or for one user name, within
  # login_window_s, before further tries are refused until the window passes.
  login_failures: 5
  login_window_s: 300
  # Reverse proxies (addresses) whose X-Forwarded-For and X-Forwarded-Proto
  # are believed: the client's address is then the one they name. Empty:
  # the address that connects is the client.
  trusted_proxies: []
"""
