"""Fixtures: a fresh database per test on every backend, and a real gRPC server on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from harness import run_sync
from postgres import PostgresServer, find_postgres
from prometheus import PrometheusTools, find_prometheus

from chronoplane.server.app import Application
from chronoplane.server.config import Settings
from chronoplane.server.storage.migrate import upgrade
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.v1 import scheduler_service_pb2_grpc

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = run_sync(find_postgres())
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.stop()


async def _admin(server: PostgresServer, *statements: str) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """prometheus and promtool, installed from Debian's package when not on PATH."""
    try:
        return find_prometheus()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> Iterator[str]:
    """A database migrated to head once; each test copies it (CREATE DATABASE … TEMPLATE)."""
    name = f"chronoplane_template_{os.getpid()}"
    run_sync(_admin(postgres, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"))
    run_sync(upgrade(postgres.url_for(name)))
    yield name
    run_sync(_admin(postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chronoplane.db"
    run_sync(upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, postgres: PostgresServer) -> Iterator[str]:
    template = request.getfixturevalue("postgres_template")
    name = f"chronoplane_test_{uuid.uuid4().hex[:12]}"
    run_sync(_admin(postgres, f"CREATE DATABASE {name} TEMPLATE {template}"))
    yield postgres.url_for(name)
    run_sync(_admin(postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "chronoplane.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database: SQLite file or PostgreSQL database."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest_asyncio.fixture
async def store(database_url: str) -> AsyncIterator[SqlAlchemyStore]:
    store = SqlAlchemyStore.from_url(database_url)
    yield store
    checked_out = store.engine.pool.checkedout()  # type: ignore[attr-defined]
    await store.close()
    assert checked_out == 0, f"{checked_out} connections were left checked out"


@dataclass
class InProcessServer:
    app: Application
    channel: grpc.aio.Channel
    stub: scheduler_service_pb2_grpc.SchedulerServiceStub
    database_url: str


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[InProcessServer]:
    """The real application on these settings, reached through a real grpc.aio channel."""
    app = Application(settings.normalized())
    running = asyncio.create_task(app.run())
    ready = asyncio.create_task(app.ready.wait())
    await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if not ready.done():
        ready.cancel()
        await running  # raises what stopped it
        raise AssertionError("server did not start")
    assert app.address is not None
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield InProcessServer(
            app,
            channel,
            scheduler_service_pb2_grpc.SchedulerServiceStub(channel),
            settings.database_url,
        )
    finally:
        await channel.close()
        app.stop()
        await asyncio.wait_for(running, 30)


@pytest_asyncio.fixture
async def server(database_url: str) -> AsyncIterator[InProcessServer]:
    """The real application on port 0, reached through a real grpc.aio channel."""
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        # Often, so that tests see history limits applied.
        purge_interval=0.5,
    )
    async with serving(settings) as running:
        yield running
