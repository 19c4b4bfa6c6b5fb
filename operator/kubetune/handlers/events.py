"""Kubernetes Events for a job's phase changes, so that `kubectl describe ctj NAME` tells
the story (launched, running, completed, failed with the pod's reason, suspended,
cancelled) without reading the operator's log.

One Event per phase change, posted through kopf (which batches them and names the operator
as the source). The message is the newest condition's message for that phase: the same
words `status.conditions` holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf

# phase -> (event type, reason, the condition whose message explains it)
PHASE_EVENTS: dict[str, tuple[str, str, str]] = {
    "Pending": ("Normal", "Launched", "Launched"),
    "Running": ("Normal", "Running", "Running"),
    "Completed": ("Normal", "Completed", "Complete"),
    "Failed": ("Warning", "Failed", "Failed"),
    "Suspended": ("Normal", "Suspended", "Suspended"),
    "Cancelled": ("Normal", "Cancelled", "Complete"),
}


def _condition_message(conditions: Any, kind: str) -> str:
    for item in conditions or []:
        if isinstance(item, Mapping) and item.get("type") == kind:
            return str(item.get("message") or "")
    return ""


def announce_phase(job: Mapping[str, Any], old_status: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> None:
    """Post an Event when ``patch`` moves ``job`` to another phase."""
    old, new = (old_status or {}).get("phase"), patch.get("phase")
    if not isinstance(new, str) or new == old or new not in PHASE_EVENTS:
        return
    event_type, reason, condition = PHASE_EVENTS[new]
    conditions = patch.get("conditions") or (old_status or {}).get("conditions")
    message = _condition_message(conditions, condition) or f"phase {old or 'none'} -> {new}"
    if new == "Completed" and isinstance(patch.get("output"), Mapping):
        message = f"{message}; output Model {patch['output'].get('name')}"
    # kopf takes any mapping with apiVersion, kind and metadata (it builds the reference).
    kopf.event(cast(kopf.Body, job), type=event_type, reason=reason, message=message)
