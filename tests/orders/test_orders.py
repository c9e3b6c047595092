"""Ordered vs performed: orders from the images, what procedures expect, and the flags the check raises."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, needs
from dicomfiles import code_item
from pydicom.dataset import Dataset

from nnrouter.core import yamlfile
from nnrouter.core.codes import Code
from nnrouter.orders import order as orders
from nnrouter.orders.order import FlagKind, Order, Seen
from nnrouter.orders.procedures import load_procedures

BOOK = load_procedures(REPO / "rules" / "procedures.yaml")


def order(description: str = "", *codes: Code, laterality: str | None = None, control: str = "NW") -> Order:
    return Order(
        source="hl7",
        accession_number="A1",
        description=description,
        codes=codes,
        laterality=laterality,
        control=control,
    )


def seen(uid: str, label: str | None, score: float = 0.97, **header) -> Seen:  # type: ignore[no-untyped-def]
    return Seen(uid, label, score if label else None, confident=label not in (None, "unknown"), **header)


def kinds(findings: list[orders.Finding]) -> list[str]:
    return sorted(f.kind for f in findings)


# --- what an order expects -----------------------------------------------------


def test_codes_patterns_and_class_codes():
    assert dict(BOOK.expect(order("XR CHEST 2 VIEWS")).views) == {"chest_pa_ap": 1, "chest_lateral": 1}
    # A LOINC code wins over the description, and the file wins over classes.csv.
    assert dict(BOOK.expect(order("whatever", Code("36643-5", "LN"))).views) == {"chest_pa_ap": 1, "chest_lateral": 1}
    # Single-view codes come from classes.csv without an entry.
    e = BOOK.expect(order("", Code("36584-1", "LN", "XR Knee AP")))
    assert dict(e.views) == {"knee_ap": 1} and e.matched_by == "code LN 36584-1"
    assert dict(BOOK.expect(order("XR Knee AP and Lateral, left")).views) == {"knee_ap": 1, "knee_lateral": 1}


def test_unmapped_is_reported_not_guessed():
    e = BOOK.expect(order("MR brain with contrast", Code("L123", "99LOCAL")))
    assert e.procedure is None and not e.views
    assert "99LOCAL L123" in e.matched_by
    f = orders.check([order("MR brain with contrast")], [seen("1", "chest_pa_ap")], BOOK)
    assert kinds(f) == [FlagKind.UNMAPPED_PROCEDURE]


@pytest.mark.parametrize(
    "text, line, field, reason",
    [
        (
            "procedures:\n  - name: x\n    patterns: ['knee']\n    expect: {knee_front: 1}\n",
            4,
            "procedures[0].expect",
            "unknown view class 'knee_front'",
        ),
        (
            "procedures:\n  - name: x\n    patterns: ['knee(']\n    expect: {knee_ap: 1}\n",
            3,
            "procedures[0].patterns",
            "not a valid regular expression",
        ),
        ("procedures:\n  - name: x\n    expect: {knee_ap: 1}\n", 2, "procedures[0]", "give codes or patterns"),
        (
            "procedures:\n  - name: x\n    patterns: [knee]\n    expekt: {knee_ap: 1}\n",
            4,
            "procedures[0].expekt",
            "unknown field",
        ),
    ],
)
def test_bad_procedures_file_says_where(tmp_path: Path, text: str, line: int, field: str, reason: str):
    f = tmp_path / "procedures.yaml"
    f.write_text(text)
    with pytest.raises(yamlfile.FileProblems) as exc:
        load_procedures(f)
    found = [p for p in exc.value.problems if (p.line, p.field) == (line, field) and reason in p.reason]
    assert found, "\n".join(map(str, exc.value.problems))


# --- the check -------------------------------------------------------------------


def test_chest_two_views_with_only_pa_misses_the_lateral():
    f = orders.check([order("XR Chest 2 Views")], [seen("1", "chest_pa_ap")], BOOK)
    assert kinds(f) == [FlagKind.MISSING_VIEW]
    assert f[0].evidence == {"expected": "chest_lateral", "count": 1, "found": 0}
    assert f[0].severity == "warning"
    assert orders.complete([order("XR Chest 2 Views")], [seen("1", "chest_pa_ap")], BOOK) is False
    both = [seen("1", "chest_pa_ap"), seen("2", "chest_lateral")]
    assert orders.check([order("XR Chest 2 Views")], both, BOOK) == []
    assert orders.complete([order("XR Chest 2 Views")], both, BOOK) is True


def test_knee_ordered_ankle_imaged_is_the_wrong_body_part():
    f = orders.check(
        [order("XR Knee AP and Lateral")], [seen("1", "ankle_ap", 0.95), seen("2", "ankle_lateral", 0.93)], BOOK
    )
    wrong = [x for x in f if x.kind == FlagKind.WRONG_BODY_PART]
    assert len(wrong) == 2 and wrong[0].severity == "error"
    assert wrong[0].evidence["predicted"] == "ankle_ap" and wrong[0].sop_instance_uid == "1"
    assert "KNEE" in wrong[0].reason
    # ... and the knee views it asked for are missing.
    assert kinds(f).count(FlagKind.MISSING_VIEW) == 2


def test_extra_view_and_too_many():
    f = orders.check([order("XR Chest 1 View")], [seen("1", "chest_pa_ap"), seen("2", "chest_lateral")], BOOK)
    assert kinds(f) == [FlagKind.EXTRA_VIEW] and f[0].sop_instance_uid == "2"
    f = orders.check([order("XR Chest 1 View")], [seen("1", "chest_pa_ap"), seen("2", "chest_pa_ap")], BOOK)
    assert kinds(f) == [FlagKind.EXTRA_VIEW] and "more chest_pa_ap" in f[0].reason


def test_low_confidence_raises_uncertain_not_a_mismatch():
    # The model said "unknown" (below its threshold): the lateral may be there.
    f = orders.check([order("XR Chest 2 Views")], [seen("1", "chest_pa_ap"), seen("2", "unknown", 0.41)], BOOK)
    assert kinds(f) == [FlagKind.UNCERTAIN]
    assert f[0].sop_instance_uid == "2" and f[0].severity == "info"
    # A class the model cannot recognise is never called missing.
    f = orders.check(
        [order("XR Knee AP and Lateral")], [seen("1", "knee_ap")], BOOK, covered={"knee_ap", "chest_pa_ap"}
    )
    assert kinds(f) == [FlagKind.UNCERTAIN] and "knee_lateral" in f[0].reason


def test_header_says_one_thing_pixels_another():
    f = orders.check([], [Seen("1", "chest_lateral", 0.98, True, body_part_examined="KNEE", view_position="PA")], BOOK)
    assert kinds(f) == [FlagKind.HEADER_CONFLICT, FlagKind.HEADER_CONFLICT]
    assert {next(iter(x.evidence["header"])) for x in f} == {"BodyPartExamined", "ViewPosition"}
    # Synonyms and compatible views are not conflicts: THORAX is CHEST, AP is a frontal view like PA.
    ok = Seen("1", "chest_pa_ap", 0.98, True, body_part_examined="Thorax", view_position="AP")
    assert orders.check([], [ok], BOOK) == []


def test_laterality_conflict():
    o = order("XR Knee AP and Lateral", laterality="L")
    f = orders.check(
        [o],
        [Seen("1", "knee_ap", 0.9, True, laterality="R"), Seen("2", "knee_lateral", 0.9, True, laterality="L")],
        BOOK,
    )
    assert kinds(f) == [FlagKind.LATERALITY_CONFLICT]
    assert f[0].sop_instance_uid == "1" and f[0].evidence == {"ordered": "L", "image": "R"}


def test_cancelled_orders_expect_nothing():
    assert orders.check([order("XR Chest 2 Views", control="CA")], [seen("1", "chest_pa_ap")], BOOK) == []


# --- orders written into the images -------------------------------------------


def test_orders_from_request_attributes_and_from_the_study():
    ds = Dataset()
    ds.AccessionNumber, ds.StudyInstanceUID, ds.Modality = "ACC9", "1.2.3", "DX"
    ds.PatientID = "P1"
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedureDescription = "XR Knee AP and Lateral right"
    item.RequestedProcedureCodeSequence = [code_item("K2", "99LOCAL", "Knee 2V")]
    ds.RequestAttributesSequence = [item]
    (o,) = orders.from_header(ds)
    assert (o.source, o.accession_number, o.requested_procedure_id, o.laterality) == ("image", "ACC9", "RP1", "R")
    assert o.codes == (Code("K2", "99LOCAL", "Knee 2V"),)
    assert dict(BOOK.expect(o).views) == {"knee_ap": 1, "knee_lateral": 1}

    plain = Dataset()
    plain.AccessionNumber, plain.StudyInstanceUID = "ACC10", "1.2.4"
    plain.ProcedureCodeSequence = [code_item("36643-5", "LN", "XR Chest 2 Views")]
    (o,) = orders.from_header(plain)
    assert o.codes[0].value == "36643-5" and orders.key(o) == "image:1.2.4:LN:36643-5"
    plain.StudyDescription = "Chest"
    del plain.ProcedureCodeSequence
    assert orders.from_header(plain)[0].description == "Chest"
    del plain.StudyDescription
    assert orders.from_header(plain) == []


# --- end to end: orders from all three sources, flags, QA routing, SR -----------

E2E_RULES = """
settings:
  quiet_s: 2
  # This sender's studies would wait a minute: only a complete order routes them sooner.
  quiet_s_by_calling_ae: {{SLOW: 120}}
destinations:
  - {{name: qa, ae_title: QA, host: 127.0.0.1, port: {qa}, retry: {{first_delay_s: 0.5, max_delay_s: 2}}}}
  - {{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs}, retry: {{first_delay_s: 0.5, max_delay_s: 2}}}}
rules:
  - name: flagged_to_qa_with_report
    priority: 10
    when: {{mismatch: any}}
    then: {{forward: [qa], report: true}}
    continue: true
  - name: everything_to_pacs
    priority: 100
    then: {{forward: [pacs]}}
"""


def _request(description: str, accession: str) -> Dataset:
    item = Dataset()
    item.AccessionNumber = accession
    item.RequestedProcedureID = "RP-" + accession
    item.RequestedProcedureDescription = description
    return item


@pytest.mark.slow
@needs("storescu", "storescp", "wlmscpfs", "dciodvfy")
def test_orders_flags_route_to_qa_with_an_sr(tmp_path: Path):
    """Image, HL7 and worklist orders; missing and wrong views go to QA with an SR; a complete study goes at once."""
    import json

    from dicomfiles import RADIOGRAPHS, first_png, png_study, wait_for, worklist_entry
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from nnrouter.orders import hl7
    from nnrouter.testing import peers

    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    qa = peers.StoreSCP(tmp_path / "qa", aet="QA")
    pacs = peers.StoreSCP(tmp_path / "pacs", aet="PACS")
    wl = peers.Wlmscpfs(tmp_path / "worklists")
    study_c = generate_uid()
    wl.folder.mkdir(parents=True)
    worklist_entry(
        wl.folder / "c.wl",
        accession="ACC_C",
        study_uid=study_c,
        code=code_item("36643-5", "LN", "XR Chest 2 Views"),
        description="XR Chest 2 Views",
        modality="DX",
        sps_description="Chest PA and lateral",
        patient_name="WL^TEST",
        patient_id="WL1",
        station=["SLOW"],
    )
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(E2E_RULES.format(qa=qa.port, pacs=pacs.port))
    hl7_port = peers.free_port()
    node = peers.Node(
        tmp_path / "node",
        settings={
            "workers": {"count": 1},
            "models": {"classifier": str(REPO / "models" / "nnrouter-view")},
            "routing": {"rules": str(rules_file), "tick_s": 0.3},
            "orders": {
                "worklist": {"host": "127.0.0.1", "port": wl.port, "ae_title": wl.aet},
                "hl7": {"bind": "127.0.0.1", "port": hl7_port},
            },
        },
    )
    try:
        for peer in (qa, pacs, wl, node):
            peer.start()
        peers.wait_port(hl7_port)
        # B: the RIS orders a knee over HL7 before the images come.
        ack = hl7.send(
            "127.0.0.1",
            hl7_port,
            (
                "MSH|^~\\&|RIS|HOSP|NNROUTER|HOSP|20261127080000||ORM^O01|MSG0001|P|2.3\r"
                "PID|1||PIDB77^^^HOSP||TEST^KNEE\r"
                "ORC|NW|PLB|FLB\r"
                "OBR|1|PLB|FLB|K2V^XR Knee AP and Lateral left^L||||||||||||||ACC_B\r"
            ),
            timeout=10,
        )
        assert b"MSA|AA|MSG0001" in ack

        files = tmp_path / "in"
        files.mkdir()
        study_a, study_b = generate_uid(), generate_uid()
        # A: the order written into the image asks for two chest views; only the PA comes.
        a = png_study(
            first_png("chest_pa_ap"),
            files / "a.dcm",
            modality="DX",
            study_uid=study_a,
            AccessionNumber="ACC_A",
            RequestAttributesSequence=[_request("XR Chest 2 Views", "ACC_A")],
        )
        # B: a chest film on the knee order.
        b = png_study(
            first_png("chest_pa_ap", 1), files / "b.dcm", modality="DX", study_uid=study_b, AccessionNumber="ACC_B"
        )
        # C: both ordered chest views, from a sender whose quiet period is two minutes.
        c1 = png_study(
            first_png("chest_pa_ap", 2), files / "c1.dcm", modality="DX", study_uid=study_c, AccessionNumber="ACC_C"
        )
        c2 = png_study(
            first_png("chest_lateral"),
            files / "c2.dcm",
            modality="DX",
            study_uid=study_c,
            AccessionNumber="ACC_C",
            series_uid=dcmread(c1).SeriesInstanceUID,
        )
        for f, aet in ((a, "DX1"), (b, "DX1"), (c1, "SLOW"), (c2, "SLOW")):
            res = peers.storescu(node.port, [f], aec=node.ae_title, aet=aet)
            assert res.returncode == 0, res.stderr

        def show(uid: str) -> dict:
            return json.loads(node.cli("study", "show", uid, "--json").stdout)

        def routed() -> bool | list:
            states = [show(u)["routing"] is not None for u in (study_a, study_b, study_c)]
            return all(states) or states

        wait_for(routed, timeout=100)
        sa, sb, sc = show(study_a), show(study_b), show(study_c)
        assert [f["kind"] for f in sa["flags"]] == ["missing_view"], sa["flags"]
        assert sa["flags"][0]["evidence"]["expected"] == "chest_lateral"
        assert [o["source"] for o in sa["orders"]] == ["image"]
        assert "wrong_body_part" in [f["kind"] for f in sb["flags"]], sb["flags"]
        assert [o["source"] for o in sb["orders"]] == ["hl7"] and sb["orders"][0]["laterality"] == "L"
        assert sc["flags"] == [] and [o["source"] for o in sc["orders"]] == ["worklist"]
        # C went before its two-minute quiet period was over: every ordered view had arrived.
        last = max(i["received_at"] for se in sc["series"] for i in se["instances"])
        from datetime import datetime

        waited = (datetime.fromisoformat(sc["routing"]["decided_at"]) - datetime.fromisoformat(last)).total_seconds()
        assert waited < 60, waited

        # The dry run shows the same flags and the rule they trigger, and sends nothing.
        dry = node.cli("rules", "test", "--rules", str(rules_file), study_a).stdout
        assert "flag warning missing_view" in dry and "flagged_to_qa_with_report" in dry, dry

        listed = json.loads(node.cli("mismatches", "--json").stdout)
        assert {r["study_uid"] for r in listed} == {study_a, study_b}

        def delivered() -> bool | tuple:
            got = (len(list(qa.folder.iterdir())), len(list(pacs.folder.iterdir())))
            return got == (4, 4) or got  # QA: A and B and their SRs; PACS: the four images

        wait_for(delivered, timeout=60)
        srs = [dcmread(p) for p in qa.folder.iterdir() if dcmread(p, stop_before_pixels=True).Modality == "SR"]
        assert sorted(str(sr.StudyInstanceUID) for sr in srs) == sorted([study_a, study_b])
        for p in qa.folder.iterdir():
            if dcmread(p, stop_before_pixels=True).Modality == "SR":
                assert peers.dciodvfy(p) == [], p
        # A's lateral comes late: it follows A's decision (QA and PACS), and A's flags are redone.
        late = png_study(
            first_png("chest_lateral", 1),
            files / "a2.dcm",
            modality="DX",
            study_uid=study_a,
            AccessionNumber="ACC_A",
            RequestAttributesSequence=[_request("XR Chest 2 Views", "ACC_A")],
        )
        assert peers.storescu(node.port, [late], aec=node.ae_title, aet="DX1").returncode == 0
        wait_for(
            lambda: (
                (len(list(qa.folder.iterdir())), len(list(pacs.folder.iterdir()))) == (5, 5)
                or (len(list(qa.folder.iterdir())), len(list(pacs.folder.iterdir())))
            ),
            timeout=60,
        )
        wait_for(lambda: show(study_a)["flags"] == [] or show(study_a)["flags"], timeout=30)
        assert show(study_a)["routing"]["decided_at"] == sa["routing"]["decided_at"]  # decided once
        # No patient name or ID in the log at info level.
        log = node.log_path.read_text()
        for phi in ("TEST^KNEE", "PIDB77", "WL^TEST", "SYNTHETIC^PATIENT", "SYN0001"):
            assert phi not in log, phi
    finally:
        for peer in (node, qa, pacs, wl):
            peer.stop()


def test_a_broken_procedures_file_shows_in_status(node_factory, tmp_path: Path):
    """Like a rule file: the router keeps running, and `nnrouter status` says what is wrong and where."""
    import json

    from dicomfiles import wait_for

    bad = tmp_path / "procedures.yaml"
    bad.write_text("procedures:\n  - name: knees\n    patterns: ['knee']\n    expect: {knee_front: 1}\n")
    node = node_factory(settings={"orders": {"procedures": str(bad)}, "routing": {"tick_s": 0.2}}).start()

    def rejected() -> bool | dict:
        status = json.loads(node.cli("status", "--json").stdout)
        return bool(status["procedures"].get("rejected")) or status["procedures"]

    wait_for(rejected, timeout=30)
    errors = json.loads(node.cli("status", "--json").stdout)["procedures"]["rejected"]["errors"]
    assert "procedures.yaml:4:" in errors and "knee_front" in errors
    bad.write_text(bad.read_text().replace("knee_front", "knee_ap"))
    wait_for(
        lambda: (
            (
                json.loads(node.cli("status", "--json").stdout)["procedures"].get("running") is not None
                and not json.loads(node.cli("status", "--json").stdout)["procedures"].get("rejected")
            )
            or "not yet"
        ),
        timeout=30,
    )
    assert node.proc.poll() is None


def test_order_updates_keep_cancels_and_replace_the_procedure(tmp_path: Path):
    """HL7 updates arrive partial: a cancel may carry only the order number; a change replaces the procedure."""
    from dataclasses import replace

    from nnrouter.core.store import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    first = Order(
        source="hl7",
        accession_number="ACC7",
        placer_order_number="PL7",
        description="XR HAND LEFT",
        laterality="L",
        codes=(Code("H2", "99LOCAL", "Hand 2V"),),
    )
    with store.write() as s:
        orders.save(s, first)
        # The change drops the side: the old "L" must not linger and raise a laterality conflict.
        orders.save(s, replace(first, control="XO", description="XR HAND", laterality=None, codes=()))
        # A cancel with the order number only (no accession, no procedure) reaches the same order.
        orders.save(s, Order(source="hl7", accession_number=None, placer_order_number="PL7", control="CA"))
        # A status message afterwards does not bring it back.
        orders.save(s, Order(source="hl7", accession_number=None, placer_order_number="PL7", control="SC"))
    with store.read() as s:
        (o,) = orders.stored_for(s, "ACC7", None)
    store.dispose()
    assert (o.description, o.laterality, o.codes, o.control) == ("XR HAND", None, (), "CA")
    assert orders.check([o], [seen("1", "chest_pa_ap")], BOOK) == []  # a cancelled order expects nothing


def test_header_naming_a_containing_part_is_no_conflict():
    for header, label in (
        ("HAND", "finger_ap"),
        ("PELVIS", "oblique_view_of_Lauenstein"),
        ("SKULL", "panoramic_radiograph"),
        ("SPINE", "lumbar_spine_ap"),
    ):
        assert orders.check([], [Seen("1", label, 0.99, True, body_part_examined=header)], BOOK) == [], (header, label)
    assert kinds(orders.check([], [Seen("1", "finger_ap", 0.99, True, body_part_examined="FOOT")], BOOK)) == [
        "header_conflict"
    ]


def test_a_dry_run_order_check_loads_procedures_without_a_trace(tmp_path: Path):
    # `rules test` on a stored study loads procedures.yaml to show the flags;
    # that must not show up in `nnrouter status` as what the router runs.
    from nnrouter.core.config import Settings
    from nnrouter.core.store import Store
    from nnrouter.orders.mismatch import OrderCheck

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    settings = Settings(orders={"procedures": REPO / "rules" / "procedures.yaml"})
    dry = OrderCheck(settings, store, record=False)
    dry.reload()
    assert dry.book is not None and store.rules_status("procedures") == {}
    live = OrderCheck(settings, store)
    live.reload()
    assert store.rules_status("procedures")["running"]["path"].endswith("procedures.yaml")
    store.dispose()
