"""Cron triggers say how their day fields join; existing jobs keep "both must match"

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

From this revision a new cron trigger's day of month and day of week join as crontab's do
(either may match when both are restricted, DAY_MATCH_ANY; docs/decisions/0028). Jobs created
before it were scheduled with both matching, so their stored triggers get "day_match": "all"
and fire as they did, as revision 0002 kept old jobs' misfire behaviour. A row without the key
(written by an older server during a rolling upgrade) reads as "all" too. No schema change:
the trigger is a JSON column. Downgrade removes the key (and a date trigger's local time,
which older servers ignore): older servers read every cron trigger as "all".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("trigger", sa.JSON))
_PAGE = 500


def _rewrite(change: Any) -> None:
    """Applies ``change`` (a trigger's JSON to its new JSON, or None to keep it) to every
    job, a page at a time."""
    connection = op.get_bind()
    after = ""
    while True:
        rows = connection.execute(
            sa.select(_jobs.c.id, _jobs.c.trigger)
            .where(_jobs.c.id > after)
            .order_by(_jobs.c.id)
            .limit(_PAGE)
        ).all()
        for job_id, trigger in rows:
            changed = change(trigger)
            if changed is not None:
                connection.execute(
                    _jobs.update().where(_jobs.c.id == job_id).values(trigger=changed)
                )
        if len(rows) < _PAGE:
            return
        after = rows[-1][0]


def _keep_all(trigger: dict[str, Any]) -> dict[str, Any] | None:
    spec = trigger.get("cron") if isinstance(trigger, dict) else None
    if spec is None or "day_match" in spec:
        return None
    return {"cron": {**spec, "day_match": "all"}}


def _forget(trigger: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(trigger, dict) or len(trigger) != 1:
        return None
    kind, spec = next(iter(trigger.items()))
    dropped = {"day_match"} if kind == "cron" else {"local_time", "time_zone"}
    if kind == "interval" or not dropped & spec.keys():
        return None
    return {kind: {key: value for key, value in spec.items() if key not in dropped}}


def upgrade() -> None:
    _rewrite(_keep_all)


def downgrade() -> None:
    _rewrite(_forget)
