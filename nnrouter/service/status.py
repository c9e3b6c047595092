"""One node's state as plain data: schema, instances per state, outbox, loaded rules, readiness.

``nnrouter status`` prints it; a monitoring script reads the same dictionary
as JSON (``--json``) and looks at ``ready`` first.
"""

from __future__ import annotations

from typing import Any

from nnrouter.core.config import Settings
from nnrouter.core.store import Store


def node_status(settings: Settings, store: Store) -> dict[str, Any]:
    from nnrouter.service import pressure

    counts = store.state_counts()
    report: dict[str, Any] = {
        "database": store.engine.url.render_as_string(hide_password=True),
        "schema": {"current": store.current_revision(), "head": store.head_revision()},
        "instances": {"total": sum(counts.values()), "by_state": counts},
        "outbox": store.outbox_counts(),
        "rules": store.rules_status("rules"),
        "procedures": store.rules_status("procedures"),
    }
    health = pressure.measure(settings, store).as_dict()
    report.update(ready=health.pop("ready"), not_ready_because=health.pop("reasons"), health=health)
    return report


def status_text(report: dict[str, Any]) -> str:
    """The report for a person at a terminal: readiness and alerts first."""
    health = report["health"]
    counts = report["instances"]["by_state"]
    lines = [
        f"ready: {'yes' if report['ready'] else 'NO: ' + '; '.join(report['not_ready_because'])}"
        + "".join(f"\nALERT: {a}" for a in health["alerts"]),
        f"database {report['database']} (schema {report['schema']['current']})",
        f"instances: {report['instances']['total']}",
    ]
    lines += [f"  {state:<16}{n}" for state, n in sorted(counts.items())]
    if report["outbox"]:
        lines.append(
            "outbox: "
            + ", ".join(
                f"{d}: " + " ".join(f"{s} {n}" for s, n in sorted(v.items()))
                for d, v in sorted(report["outbox"].items())
            )
        )
    for what in ("rules", "procedures"):
        r = report[what]
        if r.get("running"):
            lines.append(
                f"{what}: running {r['running']['path']} ({r['running']['digest'][:12]}, loaded {r['running']['at']})"
            )
        if r.get("rejected"):
            lines.append(
                f"{what}: REJECTED {r['rejected']['path']} at {r['rejected']['at']}:\n{r['rejected']['errors']}"
            )
    return "\n".join(lines)
