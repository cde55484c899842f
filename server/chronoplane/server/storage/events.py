"""What a transaction changed, and the events it appends for watchers (decision 0011).

A write transaction notes the executions and jobs it changes; just before it commits, the
store reads them as they now are and appends one event each, with cursors taken from the
``event_log`` row. That row stays locked until the commit, so cursors become visible in
order: a reader that sees cursor n sees every cursor below it.
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

from chronoplane.server.models import EventKind, EventResource

__all__ = ["Changes", "decode_body", "encode_row", "encode_values"]

# Columns of a row that are times: ISO text in the JSON body.
_TIMES = frozenset(
    {
        "scheduled_time",
        "create_time",
        "start_time",
        "end_time",
        "update_time",
        "next_run_time",
        "dispatch_time",
    }
)
# Execution columns that are the queue's bookkeeping, not the resource.
_INTERNAL = frozenset(
    {
        "dedupe_key",
        "due_time",
        "ready",
        "holds_slot",
        "force",
        "cancel_reason",
        "epoch",
        "lease_expire_time",
    }
)


class Changes:
    """The resources one transaction changed, in the order it changed them."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[EventResource, str], EventKind] = {}
        # Deleted jobs, as they were: nothing is left to read at commit.
        self.deleted: dict[str, dict[str, Any]] = {}
        # Executions whose row as written is known (an insert's values, an UPDATE's
        # RETURNING): no need to read them again at commit.
        self.known: dict[str, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def note(self, resource: EventResource, ids: Any, kind: EventKind) -> None:
        for resource_id in ids:
            key = (resource, resource_id)
            if resource is EventResource.EXECUTION:
                self.known.pop(resource_id, None)  # changed since: read it at commit
            # Created and then changed in one transaction is still an addition.
            if self.kinds.get(key) is not EventKind.ADDED:
                self.kinds[key] = kind

    def note_rows(self, rows: Any, kind: EventKind) -> None:
        """Executions changed, with their rows as they now are (mappings of every column)."""
        for row in rows:
            self.note(EventResource.EXECUTION, [row["id"]], kind)
            self.known[row["id"]] = encode_values(row)

    def ids(self, resource: EventResource) -> list[str]:
        return [
            rid
            for (res, rid), kind in self.kinds.items()
            if res == resource and kind is not EventKind.DELETED
        ]


def encode_row(row: Any) -> dict[str, Any]:
    """A job or execution row as a JSON-safe dict (what ``decode_body`` reads back)."""
    return encode_values(row._mapping)


def encode_values(values: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, value in values.items():
        if name in _INTERNAL or name == "job_labels":
            continue
        body[name] = value.isoformat() if isinstance(value, datetime) else value
    return body


def decode_body(body: dict[str, Any]) -> Any:
    """An object with the row's attributes, for the store's ``_job_from_row`` and
    ``_execution_from_row``."""
    values = {
        name: datetime.fromisoformat(value) if name in _TIMES and value is not None else value
        for name, value in body.items()
    }
    return SimpleNamespace(**values)
