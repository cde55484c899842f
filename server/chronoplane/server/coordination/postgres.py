"""One scheduling process per PostgreSQL database, held with a session advisory lock.

Advisory lock keys used by Chronoplane (bigint, one key space per database; see
docs/decisions/0002-advisory-lock-keys.md): the high 32 bits are 0x43504C4E ("CPLN"), the low
32 bits name the purpose.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.errors import InstanceConflict

__all__ = ["INSTANCE_LOCK_KEY", "MIGRATION_LOCK_KEY", "AdvisoryLockCoordinator"]

_PREFIX = 0x43504C4E << 32
INSTANCE_LOCK_KEY = _PREFIX | 1
MIGRATION_LOCK_KEY = _PREFIX | 2


class AdvisoryLockCoordinator(Coordinator):
    """Holds ``pg_try_advisory_lock(INSTANCE_LOCK_KEY)`` on a connection kept for nothing else;
    Postgres releases it when that connection ends, including when the process is killed."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def acquire(self) -> None:
        conn = await self._engine.connect()
        got = (
            await conn.execute(sa.select(sa.func.pg_try_advisory_lock(INSTANCE_LOCK_KEY)))
        ).scalar()
        await conn.commit()
        if not got:
            holder = (
                await conn.execute(
                    sa.text(
                        "SELECT a.client_addr, a.application_name, l.pid FROM pg_locks l "
                        "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
                        "AND l.classid = :high AND l.objid = :low AND l.granted"
                    ),
                    {"high": INSTANCE_LOCK_KEY >> 32, "low": INSTANCE_LOCK_KEY & 0xFFFFFFFF},
                )
            ).first()
            await conn.close()
            raise InstanceConflict(
                "another chronoplane server already schedules on this database "
                f"(backend pid {holder.pid if holder else 'unknown'}); "
                "cluster mode is not available yet"
            )
        self._conn = conn

    async def release(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.execute(sa.select(sa.func.pg_advisory_unlock(INSTANCE_LOCK_KEY)))
                await self._conn.commit()
            finally:
                await self._conn.close()
                self._conn = None
