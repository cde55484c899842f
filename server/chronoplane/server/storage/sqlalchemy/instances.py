"""Instances: registration, heartbeats and the judging of silent ones (fencing, then
ABANDONED executions), and the leadership term (docs/decisions/0009 and 0015)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    EventKind,
    Execution,
    ExecutionState,
    Instance,
)
from chronoplane.server.storage.abc import (
    InstanceStore,
)
from chronoplane.server.storage.sqlalchemy.rows import STATE_RUNNING, execution_from_mapping
from chronoplane.server.storage.sqlalchemy.session import translate_errors
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    instances,
    leadership,
)


class SqlInstanceStore(Slots, InstanceStore):
    """Instance rows, and what the leader does to the dead ones."""

    @translate_errors
    async def register_instance(self, instance: Instance) -> None:
        values = {
            "id": instance.id,
            "name": instance.name,
            "host": instance.host,
            "pid": instance.pid,
            "version": instance.version,
            "address": instance.address,
            "insecure": instance.insecure,
            "start_time": instance.start_time,
            "last_seen": self._now(),
            "max_running": instance.max_running,
            "running": instance.running,
            "draining": instance.draining,
            "fenced_at": None,
        }
        async with self._write() as conn:
            await conn.execute(
                self._insert(instances)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"}
                )
            )

    @translate_errors
    async def heartbeat_instance(
        self, instance_id: str, *, running: int, live_after: timedelta, draining: bool = False
    ) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                instances.update()
                .where(instances.c.id == instance_id, instances.c.fenced_at.is_(None))
                .values(last_seen=self._now(), running=running, draining=draining)
            )
            if not result.rowcount:
                return 0
            live = sa.select(sa.func.count()).where(
                instances.c.last_seen >= self._seen_since(live_after),
                instances.c.fenced_at.is_(None),
            )
            return max(1, int((await conn.execute(live)).scalar_one()))

    @translate_errors
    async def remove_instance(self, instance_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(instances.delete().where(instances.c.id == instance_id))

    @translate_errors
    async def list_instances(self, *, leader_timeout: timedelta) -> list[Instance]:
        # The one elected last, while it is heard from: its own heartbeat, which every
        # instance sends, SQLite's lone one too.
        leader_id = sa.select(leadership.c.leader_id).where(leadership.c.id == 1)
        leads = (instances.c.id == leader_id.scalar_subquery()) & (
            instances.c.last_seen >= self._seen_since(leader_timeout)
        )
        epoch = sa.select(leadership.c.epoch).where(leadership.c.id == 1).scalar_subquery()
        query = sa.select(instances, leads.label("leader"), epoch.label("epoch")).order_by(
            instances.c.start_time, instances.c.id
        )
        async with self._begin() as conn:
            rows = await conn.execute(query)
            return [
                Instance(
                    id=row.id,
                    name=row.name,
                    host=row.host,
                    pid=row.pid,
                    version=row.version,
                    address=row.address,
                    insecure=row.insecure,
                    start_time=row.start_time,
                    max_running=row.max_running,
                    running=row.running,
                    last_seen_time=row.last_seen,
                    leader=bool(row.leader) and row.fenced_at is None,
                    draining=row.draining,
                    epoch=row.epoch if row.leader and row.fenced_at is None else 0,
                )
                for row in rows
            ]

    @translate_errors
    async def remove_stale_instances(self, *, stale_after: timedelta) -> list[str]:
        async with self._write() as conn:
            result = await conn.execute(
                instances.delete()
                .where(instances.c.last_seen < self._seen_since(stale_after))
                .returning(instances.c.id)
            )
            return list(result.scalars())

    @translate_errors
    async def instance_heartbeats(self) -> dict[str, datetime]:
        async with self._begin() as conn:
            rows = await conn.execute(
                sa.select(instances.c.id, instances.c.last_seen).where(
                    instances.c.fenced_at.is_(None)
                )
            )
            return {row.id: row.last_seen for row in rows}

    @translate_errors
    async def execution_owners(self) -> set[str]:
        owned = (
            executions.c.state == STATE_RUNNING
        ) | executions.c.holds_slot  # ix_executions_owned
        async with self._begin() as conn:
            query = sa.select(executions.c.instance_id).where(owned).distinct()
            # "" owns what a Celery worker runs: its lease decides (abandon_expired_leases).
            return set((await conn.execute(query)).scalars()) - {""}

    @translate_errors
    async def abandon_instances(
        self,
        silent: Mapping[str, datetime | None],
        *,
        message: str,
        now: datetime,
        epoch: int | None = None,
    ) -> list[Execution]:
        async with self._write() as conn:
            if epoch is not None:
                await self._check_epoch(conn, epoch)
            fenced = [i for i, seen in sorted(silent.items()) if await self._fence(conn, i, seen)]
            # And whatever fenced instances still hold (claimed in a race with the fence).
            fenced_rows = sa.select(instances.c.id).where(instances.c.fenced_at.is_not(None))
            dead = sorted(set(fenced) | set((await conn.execute(fenced_rows)).scalars()))
            owned = (executions.c.state == STATE_RUNNING) | executions.c.holds_slot
            of_dead = owned & self._among(executions.c.instance_id, dead)
            affected = sa.select(executions.c.job_id).where(of_dead).distinct()
            freeing = list((await conn.execute(affected)).scalars())
            if not freeing:
                return []
            abandoned = await conn.execute(
                executions.update()
                .where(
                    executions.c.state == STATE_RUNNING, self._among(executions.c.instance_id, dead)
                )
                .values(
                    state=ExecutionState.ABANDONED.value,
                    end_time=now,
                    error_message=sa.literal(f"{message}: instance ") + executions.c.instance_id,
                    error_type=ABANDONED_ERROR_TYPE,
                    holds_slot=False,
                )
                .returning(*executions.c)
            )
            rows = list(abandoned.mappings())
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            # Slots of synchronous tasks that outlived their final state there, and of Celery
            # executions it was sending.
            await conn.execute(executions.update().where(of_dead).values(holds_slot=False))
            await self._promote(conn, await self._queued_jobs(conn, freeing))
        return [execution_from_mapping(row) for row in rows]

    async def _fence(self, conn: AsyncConnection, instance_id: str, seen: datetime | None) -> bool:
        """Fences the instance if it is still as silent as observed: its last heartbeat is
        still ``seen``, or (None) it is still not registered (a row that says so takes its
        place, and stops a registration racing with this). Its own heartbeat, claim or
        registration takes the row's lock too: whichever comes first wins."""
        if seen is None:
            now = self._now()
            values = {
                "id": instance_id,
                "name": "",
                "host": "",
                "pid": 0,
                "version": "",
                "address": "",
                "insecure": False,
                "start_time": now,
                "last_seen": now,
                "max_running": 0,
                "running": 0,
                "draining": False,
                "fenced_at": now,
            }
            statement = (
                self._insert(instances)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(instances.c.id)
            )
        else:
            statement = (
                instances.update()
                .where(
                    instances.c.id == instance_id,
                    instances.c.last_seen == seen,
                    instances.c.fenced_at.is_(None),
                )
                .values(fenced_at=self._now())
                .returning(instances.c.id)
            )
        return (await conn.execute(statement)).first() is not None

    @translate_errors
    async def take_leadership(self, instance_id: str) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                leadership.update()
                .where(leadership.c.id == 1)
                .values(
                    epoch=leadership.c.epoch + 1,
                    leader_id=instance_id,
                    elected_at=self._now(),
                    heartbeat_at=self._now(),
                )
                .returning(leadership.c.epoch)
            )
            return int(result.scalar_one())
