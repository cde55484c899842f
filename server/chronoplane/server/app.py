"""The composition root: builds every part, runs them, tears them down in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from chronoplane.server.config import Settings
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.coordination.local import FileLockCoordinator
from chronoplane.server.coordination.postgres import AdvisoryLockCoordinator
from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.executors.inline import InlineExecutor
from chronoplane.server.ids import new_instance_id
from chronoplane.server.pagination import PageTokens
from chronoplane.server.runner import Runner
from chronoplane.server.service import SchedulerService
from chronoplane.server.storage.migrate import upgrade
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore, create_engine
from chronoplane.server.tasks import default_registry, load_modules
from chronoplane.server.transport.server import GrpcServer

__all__ = ["Application", "serve"]

log = logging.getLogger("chronoplane.server")


class Application:
    """One server process. ``run`` returns when ``stop`` was called (or a signal came)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = new_instance_id()
        self.address: str | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Asks ``run`` to shut down; safe from a signal handler."""
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        load_modules(settings.tasks)
        async with AsyncExitStack() as stack:
            engine_sql = create_engine(settings.database_url)
            stack.push_async_callback(engine_sql.dispose)
            coordinator = self._coordinator(settings, engine_sql)
            await coordinator.acquire()
            stack.push_async_callback(coordinator.release)
            await upgrade(settings.database_url)

            store = SqlAlchemyStore(engine_sql)
            interrupted = await store.interrupt_unfinished(
                message="the server stopped while the execution was pending or running",
                now=datetime.now(UTC),
            )
            if interrupted:
                log.warning("marked %d executions of a stopped server INTERRUPTED", interrupted)
            key = await store.get_or_create_secret("page_tokens", secrets.token_bytes(32))

            executor = InlineExecutor(threads=settings.worker_threads)
            stack.push_async_callback(executor.shutdown)
            runner = Runner(
                store=store,
                executor=executor,
                tasks=default_registry,
                instance_id=self.instance_id,
            )
            await runner.start()
            stack.push_async_callback(runner.stop, settings.shutdown_grace)
            engine = ApschedulerEngine()
            service = SchedulerService(
                store=store,
                engine=engine,
                runner=runner,
                tasks=default_registry,
                page_tokens=PageTokens(key),
            )
            scheduled = await service.load_schedule()
            resumed = await service.resume_waiting()
            if resumed:
                log.info("took back %d waiting retries and backfill fires", resumed)
            await engine.start(runner.on_fires)
            stack.push_async_callback(engine.shutdown)
            purger = asyncio.create_task(self._purge_forever(service), name="purge")
            stack.push_async_callback(_cancelled, purger)

            server = GrpcServer(service, settings.address)
            await server.start()
            stack.push_async_callback(server.stop, settings.shutdown_grace)
            self.address = server.address
            log.info(
                "chronoplane %s serving on %s (instance %s, %d jobs scheduled, database %s)",
                _version(),
                server.address,
                self.instance_id,
                scheduled,
                _redacted(settings.database_url),
            )
            self.ready.set()
            await self._stop.wait()
            log.info("shutting down: no new RPCs, %d executions running", runner.running)
        log.info("stopped")

    async def _purge_forever(self, service: SchedulerService) -> None:
        days = self.settings.history_max_age_days
        max_age = timedelta(days=days) if days > 0 else None
        while True:
            try:
                purged = await service.purge_history(max_age=max_age)
            except Exception:
                log.exception("purging execution history failed; trying again later")
            else:
                if purged:
                    log.info("purged %d executions from the history", purged)
            await asyncio.sleep(self.settings.purge_interval)

    @staticmethod
    def _coordinator(settings: Settings, engine: AsyncEngine) -> Coordinator:
        path = settings.sqlite_path()
        if path is not None:
            return FileLockCoordinator(Path(path))
        return AdvisoryLockCoordinator(engine)


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancels the task and waits until it has let go of what it held."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chronoplane")
    except PackageNotFoundError:
        return "unknown"


def _redacted(url: str) -> str:
    """The database url without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: Settings) -> None:
    """Runs a server until SIGTERM or SIGINT."""
    app = Application(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    await app.run()
