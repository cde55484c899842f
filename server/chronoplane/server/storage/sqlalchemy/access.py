"""API tokens (stored hashed), the audit log of mutating calls, and server-wide secrets
(decisions 0012 and 0013)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc

from chronoplane.server.errors import (
    AlreadyExists,
)
from chronoplane.server.models import (
    AuditEvent,
    AuditPage,
    AuditQuery,
    StoredToken,
)
from chronoplane.server.storage.abc import (
    AccessStore,
)
from chronoplane.server.storage.sqlalchemy.rows import AUDIT_COLUMNS, audit_from_row, token_from_row
from chronoplane.server.storage.sqlalchemy.session import Session, translate_errors
from chronoplane.server.storage.tables import (
    audit_events,
    secrets,
    tokens,
)


class SqlAccessStore(Session, AccessStore):
    """Tokens, audit events and secrets: plain rows, one transaction each."""

    @translate_errors
    async def create_token(self, token: StoredToken) -> None:
        values = {
            "id": token.id,
            "name": token.name,
            "role": token.role.name.lower(),
            "secret_hash": token.secret_hash,
            "create_time": token.create_time,
            "expire_time": token.expire_time,
            "revoke_time": token.revoke_time,
        }
        try:
            async with self._write() as conn:
                await conn.execute(tokens.insert().values(**values))
        except exc.IntegrityError as error:
            raise AlreadyExists(f"a token named {token.name!r} exists") from error

    @translate_errors
    async def get_token(self, token_id: str) -> StoredToken | None:
        rows = await self._rows(sa.select(tokens).where(tokens.c.id == token_id))
        return token_from_row(rows[0]) if rows else None

    @translate_errors
    async def list_tokens(self) -> list[StoredToken]:
        async with self._begin() as conn:
            rows = await conn.execute(sa.select(tokens).order_by(tokens.c.name))
            return [token_from_row(row) for row in rows]

    @translate_errors
    async def revoke_token(self, name: str, *, now: datetime) -> StoredToken | None:
        async with self._write() as conn:
            await conn.execute(
                tokens.update()
                .where(tokens.c.name == name, tokens.c.revoke_time.is_(None))
                .values(revoke_time=now)
            )
            row = (await conn.execute(sa.select(tokens).where(tokens.c.name == name))).first()
        return None if row is None else token_from_row(row)

    @translate_errors
    async def record_audits(self, events: Sequence[AuditEvent]) -> None:
        rows = [{name: getattr(event, name) for name in AUDIT_COLUMNS} for event in events]
        if rows:
            async with self._write() as conn:
                await conn.execute(audit_events.insert(), rows)

    @translate_errors
    async def list_audit_events(
        self, query: AuditQuery, *, before: int | None, limit: int
    ) -> AuditPage:
        select = sa.select(audit_events).order_by(audit_events.c.id.desc()).limit(limit + 1)
        for column, value in (
            (audit_events.c.principal, query.principal),
            (audit_events.c.rpc, query.rpc),
            (audit_events.c.job_id, query.job_id),
            (audit_events.c.execution_id, query.execution_id),
        ):
            if value:
                select = select.where(column == value)
        if query.after is not None:
            select = select.where(audit_events.c.time >= query.after)
        if query.before is not None:
            select = select.where(audit_events.c.time < query.before)
        if before is not None:
            select = select.where(audit_events.c.id < before)
        rows = await self._rows(select)
        page = [audit_from_row(row) for row in rows[:limit]]
        return AuditPage(events=page, next_before=page[-1].id if len(rows) > limit else None)

    @translate_errors
    async def purge_audit_events(self, *, before: datetime) -> int:
        async with self._write() as conn:
            result = await conn.execute(audit_events.delete().where(audit_events.c.time < before))
            return int(result.rowcount)

    @translate_errors
    async def get_or_create_secret(self, name: str, value: bytes) -> bytes:
        async with self._write() as conn:
            await conn.execute(
                self._insert(secrets)
                .values(name=name, value=value)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            stored = (
                await conn.execute(sa.select(secrets.c.value).where(secrets.c.name == name))
            ).scalar_one()
        return bytes(stored)
