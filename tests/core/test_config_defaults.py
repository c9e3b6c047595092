"""One home for each default: the config and rules models; code made without them reads theirs.

Two copies of a default drift apart (the worklist query waited 30 s by
default, the config said 10); these tests hold the copies that remain,
the commented examples in ``nnrouter config example``, to the models.
"""

from __future__ import annotations

import dataclasses

import yaml

from nnrouter.core import config
from nnrouter.dicom import netguard, send
from nnrouter.orders import hl7
from nnrouter.routing import rules


def _commented_block(section: str) -> dict:
    """The commented-out keys under ``  <section>: null`` in the example config, read as YAML."""
    lines = config.EXAMPLE.splitlines()
    start = lines.index(f"  {section}: null") + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("  #  "):
            break
        block.append(line.removeprefix("  #  "))
    return yaml.safe_load("\n".join(block))


def test_the_example_hl7_block_shows_the_defaults():
    shown = _commented_block("hl7")
    assert shown == {k: v for k, v in config.Hl7().model_dump().items() if k in shown}
    assert set(shown) == set(config.Hl7.model_fields)


def test_the_example_worklist_block_shows_the_defaults():
    shown = _commented_block("worklist")
    assert set(shown) == set(config.Worklist.model_fields)
    required = {k for k, f in config.Worklist.model_fields.items() if f.is_required()}
    defaults = config.Worklist(**{k: shown[k] for k in required}).model_dump()
    assert {k: shown[k] for k in shown if k not in required} == {k: defaults[k] for k in shown if k not in required}


def test_the_worklist_calls_as_dicom_ae_title_unless_told():
    wl = config.Worklist(host="ris", port=104, ae_title="RIS_MWL")
    assert wl.calling_ae is None  # resolved where it is used, against this config's dicom.ae_title
    assert config.Worklist(host="ris", port=104, ae_title="RIS_MWL", calling_ae=" WL_SCU ").calling_ae == "WL_SCU"
    assert config.Worklist(host="ris", port=104, ae_title="RIS_MWL", calling_ae=None).calling_ae is None


def test_listener_limits_made_without_a_config_are_the_config_defaults():
    assert netguard.Limits() == netguard.Limits.from_settings(config.Dicom())
    assert hl7.Limits() == hl7.Limits.from_config(config.Hl7())
    assert config.Hl7().max_message_bytes == hl7.MAX_MESSAGE
    # Each field of the dataclasses: none is left with a default of its own.
    assert {f.name for f in dataclasses.fields(hl7.Limits)} == {
        "allowed_hosts",
        "max_connections",
        "max_connections_per_host",
        "idle_timeout_s",
        "message_timeout_s",
        "max_message",
    }


def test_send_and_echo_wait_as_a_destination_does():
    assert send._destination_timeout() == rules.Destination.model_fields["timeout_s"].default
