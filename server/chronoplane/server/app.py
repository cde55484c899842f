"""The composition root: builds every part, runs them, tears them down in reverse."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chronoplane.server.aio import cancelled, report_slow
from chronoplane.server.cluster import Member
from chronoplane.server.config import Settings
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.coordination.local import FileLock, SoleLeader
from chronoplane.server.coordination.postgres import ChangeListener, LeaderElection
from chronoplane.server.dispatch import Dispatcher
from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.executors.inline import InlineExecutor
from chronoplane.server.ids import new_instance_id
from chronoplane.server.models import Instance, Role
from chronoplane.server.pagination import PageTokens
from chronoplane.server.runner import Runner
from chronoplane.server.security import Authenticator
from chronoplane.server.service import SchedulerService
from chronoplane.server.storage.migrate import upgrade
from chronoplane.server.storage.sqlalchemy import (
    CANCEL_CHANNEL,
    EVENTS_CHANNEL,
    JOBS_CHANNEL,
    WORK_CHANNEL,
    SqlAlchemyStore,
    create_engine,
)
from chronoplane.server.tasks import default_registry, load_modules
from chronoplane.server.transport.audit import AuditInterceptor
from chronoplane.server.transport.server import GrpcServer, Limits, TlsFiles
from chronoplane.server.validation import FieldLimits
from chronoplane.server.watch import WatchHub

__all__ = ["Application", "serve"]

log = logging.getLogger("chronoplane.server")


class Application:
    """One server process. ``run`` returns when ``stop`` was called (or a signal came)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = new_instance_id()
        self.start_time = datetime.now(UTC)
        self.coordinator: Coordinator | None = None
        self.hub: WatchHub | None = None
        self.address: str | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Asks ``run`` to shut down; safe from a signal handler."""
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        load_modules(settings.tasks)
        sqlite_path = settings.sqlite_path()
        shared = sqlite_path is None
        async with AsyncExitStack() as stack:
            engine_sql = create_engine(settings.database_url)
            stack.push_async_callback(engine_sql.dispose)
            if sqlite_path is not None:
                lock = FileLock(Path(sqlite_path))
                await lock.acquire()
                stack.push_async_callback(lock.release)
            await upgrade(settings.database_url)

            store = SqlAlchemyStore(engine_sql, instance_id=self.instance_id)
            if not shared:
                # Alone on this database: whatever is unfinished, a former process left.
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
                max_running=settings.max_running,
            )
            hub = WatchHub(
                store,
                buffer=settings.watch_buffer,
                max_watchers=settings.max_watchers,
                progress_interval=settings.watch_progress_interval,
            )
            store.on_events = hub.wake
            self.hub = hub
            await hub.start()
            stack.push_async_callback(hub.stop)
            engine = ApschedulerEngine()
            service = SchedulerService(
                store=store,
                engine=engine,
                runner=runner,
                tasks=default_registry,
                page_tokens=PageTokens(key),
                leader_timeout=timedelta(seconds=settings.leader_timeout),
                watch_hub=hub,
                limits=FieldLimits(
                    args_bytes=settings.max_args_bytes,
                    args_depth=settings.max_args_depth,
                    display_name=settings.max_display_name,
                    description=settings.max_description,
                    labels=settings.max_labels,
                    label_value=settings.max_label_value,
                    page_size=settings.max_page_size,
                ),
            )
            if settings.celery_broker_url:
                from chronoplane.server.executors.celery import CeleryBroker

                dispatcher = Dispatcher(
                    store=store,
                    broker=CeleryBroker(
                        settings.celery_broker_url, send_timeout=settings.celery_send_timeout
                    ),
                    instance_id=self.instance_id,
                )
                runner.also_wake(dispatcher.notified)
                runner.revoke_with(dispatcher.revoke)
                service.dispatcher = dispatcher
                dispatcher.start()
                stack.push_async_callback(dispatcher.stop)
            member = Member(
                instance=self._instance(settings.address),
                store=store,
                service=service,
                runner=runner,
                engine=engine,
                heartbeat_interval=settings.heartbeat_interval,
                instance_timeout=settings.instance_timeout,
                shared=shared,
                leases=bool(settings.celery_broker_url),
            )
            # Unwound in reverse: the row goes last, once every execution here has ended.
            stack.push_async_callback(member.leave)
            await runner.start()
            stack.push_async_callback(runner.stop, settings.shutdown_grace)
            stack.push_async_callback(engine.shutdown)
            await member.start()
            stack.push_async_callback(member.stop)
            runner.start_claiming()  # registered now: what it claims has a live owner

            coordinator: Coordinator
            if shared:
                coordinator = LeaderElection(
                    settings.database_url,
                    self.instance_id,
                    heartbeat_interval=settings.heartbeat_interval,
                    leader_timeout=settings.leader_timeout,
                    on_elected=member.elected,
                    on_deposed=member.deposed,
                )
                listener = ChangeListener(
                    settings.database_url,
                    {
                        JOBS_CHANNEL: member.job_changed,
                        WORK_CHANNEL: runner.notified,
                        CANCEL_CHANNEL: runner.notified_cancel,
                        EVENTS_CHANNEL: hub.wake,
                    },
                    on_resync=lambda: _resync(member, hub),
                    instance_id=self.instance_id,
                )
                await listener.start()
                stack.push_async_callback(listener.stop)
            else:
                coordinator = SoleLeader(
                    lambda: store.take_leadership(self.instance_id), member.elected
                )
            member.attach(coordinator)
            self.coordinator = coordinator
            await coordinator.start()
            stack.push_async_callback(coordinator.stop)
            # Serve once the first round is decided, so a lone server serves with its schedule.
            await asyncio.wait_for(coordinator.settled(), settings.leader_timeout * 2)
            await member.settled()

            purger = asyncio.create_task(self._purge_forever(service), name="purge")
            stack.push_async_callback(cancelled, purger)
            event_purger = asyncio.create_task(self._purge_events_forever(store), name="events")
            stack.push_async_callback(cancelled, event_purger)

            required = settings.auth_required()
            authenticator = Authenticator(
                store.get_token,
                required=required,
                certificate_roles={
                    subject: Role.parse(role)
                    for subject, role in settings.certificate_roles().items()
                },
            )
            reflection = settings.reflection
            if reflection == "auto":
                reflection = "authenticated" if required else "on"
            tls = (
                TlsFiles(
                    cert=settings.tls_cert, key=settings.tls_key, client_ca=settings.tls_client_ca
                )
                if settings.tls
                else None
            )
            server = GrpcServer(
                service,
                settings.address,
                tls=tls,
                authenticator=authenticator,
                reflection=reflection,
                limits=Limits(
                    max_message_bytes=settings.max_message_bytes,
                    max_concurrent_rpcs=settings.max_concurrent_rpcs,
                    keepalive_time=settings.keepalive_time,
                    keepalive_timeout=settings.keepalive_timeout,
                    min_ping_interval=settings.min_ping_interval,
                ),
                audit=AuditInterceptor(service.record_audit, instance_id=self.instance_id),
            )
            await server.start()
            stack.push_async_callback(server.stop, settings.shutdown_grace)
            stack.callback(hub.close_streams)  # before the server waits for in-flight RPCs
            self.address = server.address
            await member.readdress(server.address)
            log.info(
                "chronoplane %s serving on %s%s (instance %s %s, %s, %d jobs scheduled, "
                "database %s)",
                _version(),
                server.address,
                " with TLS" + (" and client certificates" if settings.tls_client_ca else "")
                if tls
                else "",
                settings.instance_name or socket.gethostname(),
                self.instance_id,
                ("leader" if coordinator.epoch is not None else "follower")
                + (", credentials required" if required else ", no credentials required"),
                member.scheduled if coordinator.epoch is not None else 0,
                _redacted(settings.database_url),
            )
            self.ready.set()
            await self._stop.wait()
            log.info("shutting down: no new RPCs, %d executions running", runner.running)
            # A hang in a step of the unwind is then named in the log.
            watchdog = asyncio.create_task(
                report_slow("shutting down", 10, 15, log),
                name="shutdown-watchdog",
            )
        watchdog.cancel()
        log.info("stopped")

    def _instance(self, address: str) -> Instance:
        return Instance(
            id=self.instance_id,
            name=self.settings.instance_name or socket.gethostname(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=_version(),
            address=address,
            insecure=self.settings.insecure,
            start_time=self.start_time,
            max_running=self.settings.max_running,
        )

    async def _purge_forever(self, service: SchedulerService) -> None:
        days = self.settings.history_max_age_days
        max_age = timedelta(days=days) if days > 0 else None
        audit_days = self.settings.audit_max_age_days
        audit_max_age = timedelta(days=audit_days) if audit_days > 0 else None
        while True:
            try:
                purged = await service.purge_history(max_age=max_age, audit_max_age=audit_max_age)
            except Exception:
                log.exception("purging execution history failed; trying again later")
            else:
                if purged:
                    log.info("purged %d executions from the history", purged)
            await asyncio.sleep(self.settings.purge_interval)

    async def _purge_events_forever(self, store: SqlAlchemyStore) -> None:
        """Keeps the watch history to ``event_retention``, on the leader (once a cluster)."""
        retention = timedelta(seconds=self.settings.event_retention)
        every = min(60.0, self.settings.event_retention / 4)
        while True:
            await asyncio.sleep(every)
            if self.coordinator is None or self.coordinator.epoch is None:
                continue
            try:
                purged = await store.purge_events(before=datetime.now(UTC) - retention)
            except Exception:
                log.exception("purging watch events failed; trying again later")
            else:
                if purged:
                    log.debug("purged %d watch events", purged)


async def _resync(member: Member, hub: WatchHub) -> None:
    hub.wake()  # events committed while the listener was away are in the table
    await member.resync()


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
    freezer = asyncio.create_task(_freeze_when_ready(app), name="gc-freeze")
    try:
        await app.run()
    finally:
        freezer.cancel()


async def _freeze_when_ready(app: Application) -> None:
    """What start-up made (modules, schemas, descriptors, the schedule) lives as long as the
    process: moved out of the collector's way, a full collection takes about half as long.
    Each one stalls every stream; with 1,000 watchers it was 150 to 180 ms every 15 s
    (bench/watch_fanout.py). Done here, in the server process, not in an embedding one."""
    await app.ready.wait()
    gc.collect()
    gc.freeze()
