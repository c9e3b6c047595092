"""Stopping the SCP without cutting an instance short.

``server.shutdown()`` only stops accepting: the associations already open
live on in daemon threads, and a process that exits then ends them wherever
they are, often with a C-STORE half received. The modality sees the
association drop, not a status, and some report that as a failed study.
``Drain`` watches each association's requests and responses, so that a stop
can end every association between two requests: one that is idle is aborted
at once, one in the middle of a request is aborted just after its response
has gone out (the instance is on disk, committed, and acknowledged), and one
that is still busy when the time is up is aborted as it stands (nothing it
had not acknowledged is lost: the modality sends it again).

A request is under way from its first P-DATA PDU to the moment the last
fragment of the final response's command set has been sent (a pending C-FIND
or C-GET response is not final). Responses are counted from the DIMSE layer
in the order they are queued, and matched to the PDUs in the order they are
sent, so that the abort never goes out ahead of the response it follows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF

from nnrouter.core import logs
from nnrouter.dicom.statuses import pending

log = logs.get("nnrouter.dicom.drain")

_COMMAND, _LAST = 0x01, 0x02  # PS3.8 E.2, message control header


def _final(message: Any) -> bool:
    """A response that ends its request (not a pending one, not a sub-operation request)."""
    if not type(message).__name__.endswith("_RSP"):
        return False
    status = getattr(message.command_set, "Status", None)
    return status is None or not pending(int(status))


def _command_ends(pdu: P_DATA_TF) -> int:
    """How many command sets end in this PDU (each DIMSE message has one)."""
    n = 0
    for item in pdu.presentation_data_value_items:
        value = item.presentation_data_value or b""
        if value and value[0] & _COMMAND and value[0] & _LAST:
            n += 1
    return n


class Drain:
    """Bound to an association server before it serves; ``stop`` ends its associations between requests."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._sent: dict[int, deque[bool]] = {}  # association -> finality of each message queued, not yet sent
        self._stopping = False
        server.bind(evt.EVT_PDU_RECV, self._received)
        server.bind(evt.EVT_DIMSE_SENT, self._queued)
        server.bind(evt.EVT_PDU_SENT, self._sent_pdu)
        server.bind(evt.EVT_CONN_CLOSE, self._closed)

    # --- the association threads ---

    def _received(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            with self._lock:
                self._busy.add(id(event.assoc))

    def _queued(self, event: evt.Event) -> None:
        """In the association's thread, before the message's PDUs are queued to be sent."""
        with self._lock:
            self._sent.setdefault(id(event.assoc), deque()).append(_final(event.message))

    def _sent_pdu(self, event: evt.Event) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        ends = _command_ends(event.pdu)
        if not ends:
            return
        key = id(event.assoc)
        done = False
        with self._lock:
            queued = self._sent.get(key)
            for _ in range(ends):
                if queued:
                    done = queued.popleft() or done
            if done:
                self._busy.discard(key)
            abort = done and self._stopping
        if abort:  # the response is on the wire: the instance is acknowledged, nothing is cut short
            event.assoc.abort()

    def _closed(self, event: evt.Event) -> None:
        key = id(event.assoc)
        with self._lock:
            self._busy.discard(key)
            self._sent.pop(key, None)

    # --- the stopping thread ---

    def stop(self, deadline: float) -> dict[str, int]:
        """Stop accepting, end every association between requests; abort what is left at ``deadline`` (monotonic).

        Returns how many associations were idle, finished their request, and were cut short.
        """
        self.server.shutdown()
        with self._lock:
            self._stopping = True
            open_now = list(self.server.active_associations)
            idle = [a for a in open_now if id(a) not in self._busy]
            busy = [a for a in open_now if id(a) in self._busy]
        for assoc in idle:
            assoc.abort(block=False)
        while time.monotonic() < deadline and self._mid_request(busy):
            time.sleep(0.05)
        cut = self._mid_request(busy)
        for assoc in cut:
            assoc.abort(block=False)
        # The DUL threads are no daemons: one still waiting for a silent peer to close the connection (up to
        # the ARTIM timeout) would hold the process open past the bound. Ended, the socket closes with it.
        grace = time.monotonic() + 1.0
        while time.monotonic() < grace and any(a.dul.is_alive() for a in open_now):
            time.sleep(0.05)
        for assoc in open_now:
            if assoc.dul.is_alive():
                assoc.dul.kill_dul()
        counts = {"idle": len(idle), "finished": len(busy) - len(cut), "cut": len(cut)}
        if open_now:
            log.info("associations_ended", **counts)
        if cut:
            log.warning("associations_cut", associations=len(cut))
        return counts

    def _mid_request(self, assocs: list[Any]) -> list[Any]:
        with self._lock:
            return [a for a in assocs if id(a) in self._busy and a.is_alive()]
