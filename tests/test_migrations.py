"""Migrations are code: empty → head matches the models, and head → base → head works."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from harness import BIN, run_sync
from postgres import PostgresServer
from sqlalchemy.ext.asyncio import create_async_engine

from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.models import CronTrigger, DayMatch
from chronoplane.server.storage.migrate import alembic_config, upgrade
from chronoplane.server.storage.sqlalchemy import trigger_from_json
from chronoplane.server.storage.tables import metadata


async def _differences(url: str) -> list[object]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                )
            )
    finally:
        await engine.dispose()


async def _admin(server: PostgresServer, statement: str) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"chronoplane_migrations_{tmp_path.name[-8:].replace('-', '_')}"

    run_sync(_admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    run_sync(_admin(server, f"CREATE DATABASE {name}"))
    yield server.url_for(name)
    run_sync(_admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_upgrade_from_empty_matches_the_models(empty_url: str) -> None:
    run_sync(upgrade(empty_url))
    assert run_sync(_differences(empty_url)) == []


def test_downgrade_and_upgrade_round_trip(empty_url: str) -> None:
    run_sync(upgrade(empty_url))
    config = alembic_config(empty_url)
    run_sync(asyncio.to_thread(command.downgrade, config, "base"))
    assert run_sync(_differences(empty_url)) != []
    run_sync(upgrade(empty_url))
    assert run_sync(_differences(empty_url)) == []


def test_concurrent_migrations_on_postgres_serialize(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Several servers starting at once all migrate; the advisory lock makes it safe."""
    name = f"chronoplane_concurrent_{tmp_path.name[-8:].replace('-', '_')}"

    run_sync(_admin(postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    run_sync(_admin(postgres, f"CREATE DATABASE {name}"))
    try:
        url = postgres.url_for(name)
        processes = [
            subprocess.Popen(
                [str(BIN / "chronoplane"), "migrate", "--database-url", url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for process in processes:
            _, errors = process.communicate(timeout=60)
            assert process.returncode == 0, errors
        assert run_sync(_differences(url)) == []
    finally:
        run_sync(_admin(postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_created_late_is_computed_for_existing_executions(empty_url: str) -> None:
    """Migration 0012 marks what existed: from the id on PostgreSQL (late past 5 s, and any
    id not of ids.py's form), everything on SQLite (exact, only slower)."""
    run_sync(upgrade(empty_url, "0011"))
    scheduled = datetime(2027, 1, 1, tzinfo=UTC)
    millis = int(scheduled.timestamp() * 1000)
    ids = {
        f"{millis + 5_000:012x}{1:016x}": False,  # 5 s after: on time
        f"{millis + 5_001:012x}{2:016x}": True,  # just late
        f"{millis - 60_000:012x}{3:016x}": False,  # made before (a retry)
        "manual-1": True,  # not a time-ordered id
    }

    async def fill_and_read() -> dict[str, bool]:
        engine = create_async_engine(empty_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "INSERT INTO jobs (id, display_name, description, task, args, trigger, "
                        "paused, misfire_grace_seconds, max_concurrent, labels, misfire_policy, "
                        "catchup_limit, overlap_policy, history_limit, version, create_time, "
                        "update_time) VALUES ('j', '', '', 't', '{}', '{}', false, 1, 1, '{}', "
                        "'run_once', 1, 'skip', 0, 1, :t, :t)"
                    ),
                    {"t": scheduled},
                )
                for n, execution_id in enumerate(ids):
                    await conn.execute(
                        sa.text(
                            "INSERT INTO executions (id, job_id, state, source, dedupe_key, "
                            "scheduled_time, create_time, task, args, error_message, "
                            "error_traceback, instance_id, attempt, error_type, note, due_time, "
                            "ready, holds_slot, force) VALUES (:id, 'j', 'succeeded', "
                            "'schedule', :key, :t, :t, 't', '{}', '', '', '', 1, '', '', :t, "
                            "false, false, false)"
                        ),
                        {"id": execution_id, "key": f"k{n}", "t": scheduled},
                    )
            await asyncio.to_thread(command.upgrade, alembic_config(empty_url), "0012")
            async with engine.connect() as conn:
                rows = await conn.execute(sa.text("SELECT id, created_late FROM executions"))
                return {row.id: bool(row.created_late) for row in rows}
        finally:
            await engine.dispose()

    expected = ids if "postgresql" in empty_url else dict.fromkeys(ids, True)
    assert run_sync(fill_and_read()) == expected


def test_cron_jobs_from_before_0014_keep_both_day_fields_matching(empty_url: str) -> None:
    """Migration 0014: a cron job stored before it keeps DAY_MATCH_ALL (it fires as it did);
    other triggers are left alone; downgrade takes the key away again."""
    run_sync(upgrade(empty_url, "0013"))
    triggers = {
        "cron": {"cron": {"expression": "0 0 1,15 * 1", "time_zone": "UTC"}},
        "date": {"date": {"run_time": "2027-01-01T00:00:00+00:00"}},
    }

    async def fill() -> None:
        engine = create_async_engine(empty_url)
        try:
            async with engine.begin() as conn:
                for job_id, trigger in triggers.items():
                    await conn.execute(
                        sa.insert(sa.table("jobs", *(sa.column(c) for c in _JOB_COLUMNS))),
                        {**_JOB_ROW, "id": job_id, "trigger": json.dumps(trigger)},
                    )
        finally:
            await engine.dispose()

    async def read() -> dict[str, object]:
        engine = create_async_engine(empty_url)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(sa.text("SELECT id, trigger FROM jobs"))
                return {row.id: _json(row.trigger) for row in rows}
        finally:
            await engine.dispose()

    run_sync(fill())
    run_sync(upgrade(empty_url))
    stored = run_sync(read())
    assert stored["date"] == triggers["date"]
    cron = trigger_from_json(stored["cron"])  # type: ignore[arg-type]
    assert isinstance(cron, CronTrigger) and cron.day_match == DayMatch.ALL
    # Mondays that are a 1st or a 15th, not every Monday.
    start = datetime(2026, 6, 2, tzinfo=UTC)
    fires = ApschedulerEngine().preview(cron, start=start, count=2)
    assert fires == [datetime(2026, 6, 15, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)]
    run_sync(asyncio.to_thread(command.downgrade, alembic_config(empty_url), "0013"))
    assert run_sync(read()) == triggers


_JOB_ROW = {
    "display_name": "",
    "description": "",
    "task": "t",
    "args": "{}",
    "paused": False,
    "misfire_grace_seconds": 1,
    "max_concurrent": 1,
    "labels": "{}",
    "misfire_policy": "run_once",
    "catchup_limit": 1,
    "overlap_policy": "skip",
    "history_limit": 0,
    "version": 1,
    "create_time": datetime(2026, 1, 1, tzinfo=UTC),
    "update_time": datetime(2026, 1, 1, tzinfo=UTC),
}
_JOB_COLUMNS = ["id", "trigger", *_JOB_ROW]


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value
