"""Modality Worklist C-FIND: the order behind a study, asked of the RIS by accession number.

Where the RIS runs a worklist SCP, it already answers the modalities' queries;
asking it the same question (by accession number or Study Instance UID) gets
nnrouter the order without any interface to set up. Each scheduled procedure
step that comes back becomes one ``Order``, the same value HL7 and the images
give.
"""

from __future__ import annotations

import contextlib

from pydicom.dataset import Dataset
from pynetdicom import AE, Association, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import ModalityWorklistInformationFind

from nnrouter.core import logs
from nnrouter.dicom.matching import has_wildcard
from nnrouter.dicom.statuses import STATUS_SUCCESS, category, pending
from nnrouter.orders.laterality import laterality_from_text
from nnrouter.orders.order import Order, OrderSource, codes_of, text_of

__all__ = ["WorklistError", "query"]

log = logs.get("nnrouter.dicom.worklist")


class WorklistError(Exception):
    """The worklist could not be asked: peer down, association refused, or a failure status."""


def query(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    accession_number: str | None = None,
    study_uid: str | None = None,
    timeout: float,  # orders.worklist.timeout_s: its one default lives there
) -> list[Order]:
    """The orders the worklist SCP holds for an accession number and/or Study Instance UID.

    With neither, the whole worklist. An empty list means the SCP answered and
    knows no such order.
    """
    peer = f"{called_ae} at {host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(ModalityWorklistInformationFind)
    seen: dict[str, object] = {}

    def watch(event: evt.Event) -> None:
        # What happened on the wire, since pynetdicom's own flags can't tell a
        # peer that is down from one that answered and hung up, and sometimes
        # report a rejection the peer followed by closing as an abort.
        if event.event is evt.EVT_CONN_OPEN:
            seen["connected"] = True
        elif isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen["rejected"] = event.pdu

    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, watch), (evt.EVT_PDU_RECV, watch)]
    )
    if not assoc.is_established:
        raise WorklistError(f"worklist {peer}: {_why_not(assoc, seen)}")
    found: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(
            _identifier(accession_number, study_uid), ModalityWorklistInformationFind
        ):
            if "Status" not in status:
                raise WorklistError(f"worklist {peer}: no response to C-FIND (timeout or abort)")
            code = int(status.Status)
            if pending(code):
                if identifier is not None:
                    found.append(identifier)
            elif category(code) != STATUS_SUCCESS:
                comment = status.get("ErrorComment", "")
                raise WorklistError(
                    f"worklist {peer}: C-FIND failed with status 0x{code:04X}" + (f" ({comment})" if comment else "")
                )
    finally:
        if assoc.is_established:
            assoc.release()
    orders: list[Order] = []
    for ds in found:
        order = _order(ds)
        # wlmscpfs and others do not match on every key (Study Instance UID
        # among them) and return everything instead: check here as well,
        # leaving wildcard matching to the SCP.
        if _literal(accession_number) and order.accession_number != accession_number:
            continue
        if _literal(study_uid) and order.study_uid != study_uid:
            continue
        if order not in orders:
            orders.append(order)
    log.info(
        "worklist_queried",
        peer=f"{host}:{port}",
        called_ae=called_ae,
        study_uid=study_uid,
        responses=len(found),
        orders=len(orders),
    )
    log.debug("worklist_queried_for", accession_number=accession_number)
    return orders


def _literal(value: str | None) -> bool:
    return bool(value) and not has_wildcard(value or "")


def _why_not(assoc: Association, seen: dict[str, object]) -> str:
    rj = seen.get("rejected")
    if isinstance(rj, A_ASSOCIATE_RJ):
        return f"association rejected: {rj.result_str}, {rj.source_str}, {rj.reason_str}"
    if not seen.get("connected"):
        return "cannot connect (peer down, refused or timed out)"
    if assoc.rejected_contexts and not assoc.accepted_contexts:  # pynetdicom aborts such an association
        return "the peer does not accept Modality Worklist queries"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association (timed out)"


def _code_item() -> Dataset:
    item = Dataset()
    item.CodeValue = ""
    item.CodingSchemeDesignator = ""
    item.CodeMeaning = ""
    return item


def _identifier(accession_number: str | None, study_uid: str | None) -> Dataset:
    """The MWL query: the two match keys, and empty return keys for what an Order holds."""
    ds = Dataset()
    ds.AccessionNumber = accession_number or ""
    ds.StudyInstanceUID = study_uid or ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.RequestedProcedureID = ""
    ds.RequestedProcedureDescription = ""
    ds.RequestedProcedureCodeSequence = [_code_item()]
    ds.PlacerOrderNumberImagingServiceRequest = ""
    ds.FillerOrderNumberImagingServiceRequest = ""
    sps = Dataset()
    sps.Modality = ""
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepStartDate = ""
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProcedureStepDescription = ""
    sps.ScheduledProcedureStepID = ""
    sps.ScheduledProtocolCodeSequence = [_code_item()]
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def _order(ds: Dataset) -> Order:
    with contextlib.suppress(LookupError, ValueError):
        ds.decode()  # Specific Character Set, where the SCP sent one
    sps = (ds.get("ScheduledProcedureStepSequence") or [Dataset()])[0]
    sps_description = text_of(sps, "ScheduledProcedureStepDescription")
    description = text_of(ds, "RequestedProcedureDescription") or sps_description or None
    scheduled = text_of(sps, "ScheduledProcedureStepStartDate") + text_of(sps, "ScheduledProcedureStepStartTime")
    return Order(
        source=OrderSource.WORKLIST,
        accession_number=text_of(ds, "AccessionNumber") or None,
        study_uid=text_of(ds, "StudyInstanceUID") or None,
        requested_procedure_id=text_of(ds, "RequestedProcedureID") or None,
        placer_order_number=text_of(ds, "PlacerOrderNumberImagingServiceRequest") or None,
        filler_order_number=text_of(ds, "FillerOrderNumberImagingServiceRequest") or None,
        codes=codes_of(ds.get("RequestedProcedureCodeSequence")),
        description=description,
        laterality=laterality_from_text(description) or laterality_from_text(sps_description),
        modality=text_of(sps, "Modality").upper() or None,
        scheduled_at=scheduled or None,
        patient_id=text_of(ds, "PatientID") or None,
        patient_name=text_of(ds, "PatientName") or None,
        extra={
            "scheduled_procedure_step_id": text_of(sps, "ScheduledProcedureStepID") or None,
            "scheduled_station_ae_title": text_of(sps, "ScheduledStationAETitle") or None,
            "scheduled_procedure_step_description": sps_description or None,
            "scheduled_protocol_codes": codes_of(sps.get("ScheduledProtocolCodeSequence")),
        },
    )
