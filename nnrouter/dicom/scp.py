"""SCP: the one AE nnrouter listens on, and the small handlers that bind each service to it.

One AE title and port answer every service, as a PACS expects of a peer:

==========================  ==================================================
C-ECHO                      Success, for anyone the association check lets in
C-STORE                     ``nnrouter.dicom.receive`` keeps the instance
C-FIND, Q/R models          ``nnrouter.dicom.query`` searches the store
C-FIND, Hanging Protocol    ``nnrouter.dicom.protocols_find`` over the generic
                            protocols of ``nnrouter.results.hanging``
==========================  ==================================================

Who may talk is decided here, before any service runs: the association is
refused while the site is under pressure (``nnrouter.service.pressure``) or
when ``dicom.allowed_calling_aes`` does not list the calling AE (and host).
Who may query is decided with the C-FIND handler: a peer outside
``dicom.query_aes`` is answered Refused: Not Authorized, whatever it asked,
so a modality allowed to store cannot read the index back.
Each accepted association ends with one ``association`` log line: who, how
many instances and bytes, the statuses answered, and how it ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    HangingProtocolInformationModelFind,
    HangingProtocolStorage,
    Verification,
)

from nnrouter.core import audit, logs
from nnrouter.core.config import AllowedPeer, Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import Store
from nnrouter.dicom import netguard
from nnrouter.dicom.protocols_find import Protocols
from nnrouter.dicom.query import TRANSFER_SYNTAXES as QUERY_TRANSFER_SYNTAXES
from nnrouter.dicom.query import Query
from nnrouter.dicom.receive import ACCEPTED_TRANSFER_SYNTAXES, Receiver, store_request
from nnrouter.dicom.retrieve import GET_MODELS, MOVE_MODELS, Retrieve
from nnrouter.dicom.statuses import NOT_AUTHORIZED, SUCCESS, with_comment
from nnrouter.service import pressure

__all__ = ["Scp", "make_ae", "peer_allowed", "serve"]

log = logs.get("nnrouter.dicom.scp")

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, service-user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def peer_allowed(peers: list[AllowedPeer], calling_ae: str, host: str) -> bool:
    """Whether a calling AE title (from this host) is one of the declared peers."""
    return any(p.ae_title == calling_ae and (p.host is None or p.host == host) for p in peers)


def _requested_by(event: evt.Event) -> str:
    """The calling AE title of an association being requested: it is in the A-ASSOCIATE primitive until accepted."""
    primitive = event.assoc.requestor.primitive
    return ((primitive.calling_ae_title if primitive is not None else None) or "").strip()


@dataclass
class _AssocStats:
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class Scp:
    """The handlers of the one AE: the association checks and log, and one small handler per service."""

    def __init__(self, settings: Settings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.receiver = Receiver(settings, store, spool)
        self.query = Query(store)
        self.retrieve = Retrieve(settings, store)
        self.protocols = Protocols()
        self.pressure = pressure.Pressure(settings, store)  # back-pressure, checked in on_requested
        self._assocs: dict[int, _AssocStats] = {}
        self._assocs_lock = threading.Lock()

    # --- associations ---

    def on_requested(self, event: evt.Event) -> None:
        """Check the calling AE (and its host) before negotiation starts."""
        # Back-pressure (nnrouter.service.pressure): a spool or queue near its limit refuses new work, transiently.
        busy = self.pressure.refusal(event)
        if busy is not None:
            log.warning(
                "association_refused_busy",
                calling_ae=_requested_by(event),
                peer=event.assoc.requestor.address,
                reason=busy,
            )
            self._audit("association", _requested_by(event), event.assoc.requestor.address, "refused", reason=busy)
            event.assoc.acse.send_reject(*pressure.REJECT_BUSY)
            event.assoc.kill()
            return
        allowed = self.settings.dicom.allowed_calling_aes
        if not allowed:
            return
        requestor = event.assoc.requestor
        calling = _requested_by(event)
        host = requestor.address
        if peer_allowed(allowed, calling, host):
            return
        log.warning("association_rejected", calling_ae=calling, peer=host, reason="calling AE title not allowed")
        self._audit("association", calling, host, "refused", reason="calling AE title not allowed")
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        # Wait until the A-ASSOCIATE-RJ has gone out and the peer hung up
        # (as pynetdicom's own rejections do); otherwise the socket may close
        # first and the peer sees an abort instead of the reason.
        event.assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        a = event.assoc
        with self._assocs_lock:
            self._assocs[id(a)] = _AssocStats(
                calling_ae=a.requestor.ae_title.strip(),
                called_ae=a.acceptor.ae_title.strip(),
                peer=f"{a.requestor.address}:{a.requestor.port}",
            )

    def on_rejected(self, event: evt.Event) -> None:
        a = event.assoc
        calling = (a.requestor.primitive.calling_ae_title or "").strip() if a.requestor.primitive else None
        called = (a.requestor.primitive.called_ae_title or "").strip() if a.requestor.primitive else None
        log.warning("association_rejected", calling_ae=calling, called_ae=called, peer=a.requestor.address)
        self._audit("association", calling or "?", a.requestor.address, "refused", called_ae=called)

    def _audit(self, action: str, actor: str, address: str | None, result: str, **detail: Any) -> None:
        """One DICOM audit row (``nnrouter.core.audit``); a store that is down costs the row, never the answer."""
        try:
            audit.record(
                self.store,
                source="dicom",
                actor=actor or "?",
                address=address,
                action=action,
                result=result,
                node=self.settings.node.name,
                **detail,
            )
        except Exception as exc:
            log.warning("audit_not_written", action=action, error=type(exc).__name__)

    def on_released(self, event: evt.Event) -> None:
        self._log_association(event, "released")

    def on_aborted(self, event: evt.Event) -> None:
        # pynetdicom signals an abort after the connection has closed, and
        # turns network failures and timeouts into aborts too, so released
        # and aborted between them see every accepted association end.
        self._log_association(event, "aborted")

    def _log_association(self, event: evt.Event, ended: str) -> None:
        with self._assocs_lock:
            stats = self._assocs.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "association",
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer=stats.peer,
            instances=stats.instances,
            bytes=stats.bytes,
            duration_s=round(time.monotonic() - stats.started, 3),
            statuses=stats.statuses,
            ended=ended,
        )
        self._audit(
            "association",
            stats.calling_ae,
            stats.peer.rsplit(":", 1)[0],
            "ok",
            called_ae=stats.called_ae,
            instances=stats.instances,
            bytes=stats.bytes,
            statuses=stats.statuses,
            ended=ended,
        )

    # --- the services ---

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        status, reason = self.receiver.store_instance(event)
        stats = self._assocs.get(id(event.assoc))
        if stats is not None:
            key = f"0x{status:04X}"
            stats.statuses[key] = stats.statuses.get(key, 0) + 1
            if status == SUCCESS:
                stats.instances += 1
                stats.bytes += len(store_request(event)[1].getbuffer())
        # Out of Resources (0xA7xx) is mostly the store or the disk: an audit write would wait for it too.
        if status != SUCCESS and status >> 8 != 0xA7:
            self._audit(
                "instance_refused",
                event.assoc.requestor.ae_title.strip(),
                event.assoc.requestor.address,
                "refused",
                status=f"0x{status:04X}",
                reason=reason,
                sop_instance_uid=str(store_request(event)[0].AffectedSOPInstanceUID or ""),
            )
        return SUCCESS if status == SUCCESS else with_comment(status, reason)

    def on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        """Hanging Protocol queries get the generic protocols; the Q/R models query the store.

        Only from the peers in ``dicom.query_aes``: anyone else is answered
        Refused: Not Authorized, whatever they asked.
        """
        refused = self.query_refused(event)
        requestor = event.assoc.requestor
        # The level and model only: the identifier may name a patient.
        model = str(event.request.AffectedSOPClassUID)
        if refused is not None:
            self._audit("query", requestor.ae_title.strip(), requestor.address, "refused", model=model)
            return iter([(with_comment(NOT_AUTHORIZED, refused), None)])
        self._audit("query", requestor.ae_title.strip(), requestor.address, "ok", model=model)
        if event.request.AffectedSOPClassUID == HangingProtocolInformationModelFind:
            return self.protocols.handle_find(event)
        return self.query.handle_find(event)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: the instances go back on the requester's own association (its storage SCP role)."""
        refused = self._retrieve_refused(event, "C-GET")
        return self.retrieve.handle_get(event, refused)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE: the instances go to a destination named in ``dicom.move_destinations``."""
        refused = self._retrieve_refused(event, "C-MOVE")
        return self.retrieve.handle_move(event, refused)

    def _retrieve_refused(self, event: evt.Event, service: str) -> str | None:
        refused = self.query_refused(event)
        requestor = event.assoc.requestor
        destination = getattr(event, "move_destination", None) if service == "C-MOVE" else None
        if isinstance(destination, bytes):
            destination = destination.decode(errors="replace").strip()
        self._audit(
            "retrieve",
            requestor.ae_title.strip(),
            requestor.address,
            "refused" if refused else "ok",
            service=service,
            level=str(event.identifier.get("QueryRetrieveLevel", "")) if refused is None else None,
            destination=destination,
        )
        return refused

    def query_refused(self, event: evt.Event) -> str | None:
        """Why this peer may not query (the Error Comment), or None when it is declared in query_aes."""
        requestor = event.assoc.requestor
        calling = requestor.ae_title.strip()
        if peer_allowed(self.settings.dicom.query_aes, calling, requestor.address):
            return None
        log.warning(
            "query_refused",
            calling_ae=calling,
            peer=requestor.address,
            status=f"0x{NOT_AUTHORIZED:04X}",
            reason="calling AE not in dicom.query_aes",
        )
        return f"calling AE {calling} is not allowed to query"

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
        ]


def make_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in the syntaxes we keep, and the FIND models."""
    d = settings.dicom
    ae = AE(ae_title=d.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = d.max_associations
    ae.maximum_pdu_size = d.max_pdu
    ae.acse_timeout = d.acse_timeout_s
    ae.dimse_timeout = d.dimse_timeout_s
    ae.network_timeout = d.network_timeout_s
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None  # pynetdicom's list names each context's SOP class
        # Either role, as the requester proposes: a modality stores to us (we are SCP), a C-GET requester
        # takes what it retrieves on the same association (it is SCP, we send).
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for uid in (*Query.contexts(), HangingProtocolInformationModelFind, *GET_MODELS, *MOVE_MODELS):
        ae.add_supported_context(uid, QUERY_TRANSFER_SYNTAXES)
    # Hanging protocols are stored to us like images (a viewer's own, or ours sent back).
    ae.add_supported_context(HangingProtocolStorage, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def serve(settings: Settings, store: Store, spool: Spool, *, block: bool = True) -> netguard.GuardedServer | None:
    """Start the SCP; returns the pynetdicom server, running in a thread, when ``block`` is False."""
    scp = Scp(settings, store, spool)
    swept = spool.sweep_incoming()
    ae = make_ae(settings)
    d = settings.dicom
    log.info(
        "listening",
        ae_title=d.ae_title,
        bind=d.bind,
        port=d.port,
        spool=str(spool.root),
        database=store.engine.url.render_as_string(hide_password=True),
        swept_partial_files=swept,
    )
    tls = netguard.tls_context(d.tls) if d.tls is not None else None
    server = netguard.make_server(ae, (d.bind, d.port), netguard.Limits.from_settings(d), scp.handlers(), tls=tls)
    if d.tls is not None:
        log.info(
            "tls",
            cert=str(d.tls.cert),
            ca=str(d.tls.ca) if d.tls.ca else None,
            require_client_cert=d.tls.require_client_cert,
        )
    if not block:
        return netguard.run_in_thread(server)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return None
