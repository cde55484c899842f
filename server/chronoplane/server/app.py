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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chronoplane.server import metrics, tracing
from chronoplane.server.aio import cancelled, report_slow
from chronoplane.server.census import Census
from chronoplane.server.cluster import Member
from chronoplane.server.config import ConfigError, Settings
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.coordination.local import FileLock, SoleLeader
from chronoplane.server.coordination.postgres import ChangeListener, LeaderElection
from chronoplane.server.dispatch import Dispatcher
from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.executors.inline import InlineExecutor
from chronoplane.server.ids import new_instance_id
from chronoplane.server.logs import describe_process, failure
from chronoplane.server.metrics import MetricsServer
from chronoplane.server.models import Instance, Role
from chronoplane.server.pagination import PageTokens
from chronoplane.server.runner import Runner
from chronoplane.server.security import Authenticator
from chronoplane.server.service import SchedulerService
from chronoplane.server.stall import LoopMonitor
from chronoplane.server.storage.migrate import upgrade
from chronoplane.server.storage.sqlalchemy import (
    CANCEL_CHANNEL,
    EVENTS_CHANNEL,
    JOBS_CHANNEL,
    WORK_CHANNEL,
    SessionLimits,
    SqlAlchemyStore,
    create_engine,
)
from chronoplane.server.tasks import default_registry, load_modules
from chronoplane.server.transport.audit import AuditInterceptor
from chronoplane.server.transport.server import GrpcServer, Limits, TlsFiles
from chronoplane.server.watch import WatchHub

__all__ = ["Application", "serve"]

log = logging.getLogger("chronoplane.server")


@dataclass(frozen=True, kw_only=True)
class _Parts:
    runner: Runner
    hub: WatchHub
    engine: ApschedulerEngine
    service: SchedulerService
    member: Member


class Application:
    """One server process. ``run`` returns when ``stop`` was called (or a signal came)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = new_instance_id()
        self.start_time = datetime.now(UTC)
        self.coordinator: Coordinator | None = None
        self.hub: WatchHub | None = None
        self.address: str | None = None
        self.metrics: MetricsServer | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        describe_process(self.instance_id, self._epoch)

    def stop(self) -> None:
        """Asks ``run`` to shut down; safe from a signal handler."""
        self._stop.set()

    async def run(self) -> None:
        """Builds the parts, serves until ``stop``, then takes them down in this order: the
        instance says it is draining; the timer stops and the fires it made are recorded;
        leadership is handed over; streams end and in-flight calls and runs get the shutdown
        grace (runs not done by then are INTERRUPTED); only then do the heartbeats end and the
        instance's row go, so that no one takes a draining instance for dead."""
        settings = self.settings
        load_modules(settings.tasks)
        async with AsyncExitStack() as stack:
            store = await self._open_store(stack)
            parts = await self._build(stack, store)
            member, runner, hub, service = parts.member, parts.runner, parts.hub, parts.service
            monitor = LoopMonitor()
            monitor.on_stall(member.stalled)
            monitor.on_lag(metrics.EVENT_LOOP_LAG.observe)
            monitor.start()
            stack.callback(monitor.stop)
            # Pushed now, so that they unwind after the runs have drained: the row goes
            # last, the heartbeats just before it, change notifications (cancels) before that.
            stack.push_async_callback(member.leave)
            stack.push_async_callback(member.stop)
            coordinator, listener = self._coordination(store, member, runner, hub)
            if listener is not None:
                stack.push_async_callback(listener.stop)
            await runner.start()
            await member.start()
            runner.start_claiming()  # registered now: what it claims has a live owner
            if listener is not None:
                await listener.start()
            member.attach(coordinator)
            self.coordinator = coordinator
            server = self._grpc_server(service, store)
            stack.push_async_callback(self._stop_metrics)  # after the drain: it is watched
            stack.push_async_callback(self._drain, server, runner, hub)
            stack.push_async_callback(coordinator.stop)
            stack.push_async_callback(runner.flush_fires)
            stack.push_async_callback(parts.engine.shutdown)
            await coordinator.start()
            if await self._settled(coordinator, member):
                await self._serve(stack, server, parts, store)
                await self._stop.wait()
            log.info("shutting down: no new RPCs, %d executions running", runner.running)
            # A hang in a step of the unwind is then named in the log.
            watchdog = asyncio.create_task(
                report_slow("shutting down", 10, 15, log),
                name="shutdown-watchdog",
            )
        watchdog.cancel()
        log.info("stopped")

    async def _settled(self, coordinator: Coordinator, member: Member) -> bool:
        """Waits for the first round to be decided, so that a lone server serves with its
        schedule, unless asked to stop first (a million jobs' schedule takes a while to
        load); returns whether to serve."""

        async def first_round() -> None:
            await asyncio.wait_for(coordinator.settled(), self.settings.leader_timeout * 2)
            await member.settled()

        settling = asyncio.ensure_future(first_round())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([settling, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not settling.done():
            await cancelled(settling)
            return False
        settling.result()
        return True

    async def _serve(
        self, stack: AsyncExitStack, server: GrpcServer, parts: _Parts, store: SqlAlchemyStore
    ) -> None:
        """Starts the side tasks, the gRPC server, then the metrics endpoint, and says so."""
        tasks = [
            asyncio.create_task(self._purge_forever(parts.service), name="purge"),
            asyncio.create_task(self._purge_events_forever(store), name="events"),
        ]
        if self.settings.metrics_address:
            census = Census(store, leading=self._leading)
            tasks.append(asyncio.create_task(census.run_forever(), name="census"))
        for task in tasks:
            stack.push_async_callback(cancelled, task)
        await server.start()
        parts.member.on_health(server.serving)
        stack.push_async_callback(parts.member.drain)
        self.address = server.address
        await parts.member.readdress(server.address)
        self._start_metrics()
        self._log_serving(server, parts.member)
        self.ready.set()

    def _leading(self) -> bool:
        return self.coordinator is not None and self.coordinator.epoch is not None

    def _start_metrics(self) -> None:
        """The /metrics endpoint, once the gRPC server serves; with its TLS."""
        settings = self.settings
        if not settings.metrics_address:
            return
        try:
            self.metrics = MetricsServer(
                settings.metrics_address,
                certfile=settings.tls_cert,
                keyfile=settings.tls_key,
                client_ca=settings.tls_client_ca,
            )
        except OSError as error:
            raise ConfigError(
                f"metrics_address {settings.metrics_address}: cannot serve metrics there: {error}"
            ) from None

    async def _stop_metrics(self) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None

    def _epoch(self) -> int | None:
        """The leadership term this instance leads under, for its log lines."""
        return self.coordinator.epoch if self.coordinator is not None else None

    async def _open_store(self, stack: AsyncExitStack) -> SqlAlchemyStore:
        """The database, migrated; on SQLite locked to this process, and what a former
        process left unfinished marked INTERRUPTED."""
        settings = self.settings
        engine_sql = create_engine(
            settings.database_url,
            application_name=f"chronoplane {self.instance_id}",
            limits=SessionLimits(
                lock_timeout=settings.leader_timeout,
                idle_in_transaction=settings.leader_timeout,
                statement=settings.statement_timeout,
            ),
        )
        stack.push_async_callback(engine_sql.dispose)
        sqlite_path = settings.sqlite_path()
        if sqlite_path is not None:
            lock = FileLock(Path(sqlite_path))
            await lock.acquire()
            stack.push_async_callback(lock.release)
        await upgrade(settings.database_url)
        store = SqlAlchemyStore(engine_sql, instance_id=self.instance_id)
        if settings.metrics_address:
            metrics.use_task_labels(settings.metrics_task_labels)
            metrics.sample_pool(store.pool_usage)
        if sqlite_path is not None:
            # Alone on this database: whatever is unfinished, a former process left.
            interrupted = await store.interrupt_unfinished(
                message="the server stopped while the execution was pending or running",
                now=datetime.now(UTC),
            )
            if interrupted:
                log.warning("marked %d executions of a stopped server INTERRUPTED", interrupted)
        return store

    async def _build(self, stack: AsyncExitStack, store: SqlAlchemyStore) -> _Parts:
        settings = self.settings
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
            limits=settings.field_limits(),
            horizon=timedelta(seconds=settings.schedule_horizon),
        )
        if settings.celery_broker_url:
            self._start_dispatcher(stack, store, runner, service)
        member = Member(
            instance=self._instance(settings.address),
            store=store,
            service=service,
            runner=runner,
            engine=engine,
            heartbeat_interval=settings.heartbeat_interval,
            instance_timeout=settings.instance_timeout,
            shared=settings.sqlite_path() is None,
            leases=bool(settings.celery_broker_url),
        )
        runner.on_fenced(member.fenced)
        return _Parts(runner=runner, hub=hub, engine=engine, service=service, member=member)

    def _start_dispatcher(
        self,
        stack: AsyncExitStack,
        store: SqlAlchemyStore,
        runner: Runner,
        service: SchedulerService,
    ) -> None:
        from chronoplane.server.executors.celery import CeleryBroker

        settings = self.settings
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

    def _coordination(
        self, store: SqlAlchemyStore, member: Member, runner: Runner, hub: WatchHub
    ) -> tuple[Coordinator, ChangeListener | None]:
        """Who leads: an election on PostgreSQL, with a listener for the others' changes;
        the lone process on SQLite."""
        settings = self.settings
        if settings.sqlite_path() is not None:
            leader = SoleLeader(lambda: store.take_leadership(self.instance_id), member.elected)
            return leader, None
        election = LeaderElection(
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
        return election, listener

    def _grpc_server(self, service: SchedulerService, store: SqlAlchemyStore) -> GrpcServer:
        settings = self.settings
        required = settings.auth_required()
        authenticator = Authenticator(
            store.get_token,
            required=required,
            certificate_roles={
                subject: Role.parse(role) for subject, role in settings.certificate_roles().items()
            },
        )
        reflection = settings.reflection
        if reflection == "auto":
            reflection = "authenticated" if required else "on"
        tls = (
            TlsFiles(cert=settings.tls_cert, key=settings.tls_key, client_ca=settings.tls_client_ca)
            if settings.tls
            else None
        )
        return GrpcServer(
            service,
            settings.address,
            tls=tls,
            traced=tracing.enabled(),
            authenticator=authenticator,
            reflection=reflection,
            limits=Limits(
                max_message_bytes=settings.max_message_bytes,
                max_concurrent_rpcs=settings.max_concurrent_rpcs,
                keepalive_time=settings.keepalive_time,
                keepalive_timeout=settings.keepalive_timeout,
                min_ping_interval=settings.min_ping_interval,
            ),
            audit=AuditInterceptor(service.record_audits, instance_id=self.instance_id),
            metrics=bool(settings.metrics_address),
        )

    async def _drain(self, server: GrpcServer, runner: Runner, hub: WatchHub) -> None:
        """Streams end (clients resume elsewhere); in-flight calls and runs get the grace,
        side by side; runs not done by then are INTERRUPTED."""
        grace = self.settings.shutdown_grace
        hub.close_streams()
        await asyncio.gather(server.stop(grace), runner.stop(grace))

    def _log_serving(self, server: GrpcServer, member: Member) -> None:
        settings = self.settings
        coordinator = self.coordinator
        leading = coordinator is not None and coordinator.epoch is not None
        tls = ""
        if settings.tls:
            tls = " with TLS" + (" and client certificates" if settings.tls_client_ca else "")
        if self.metrics is not None:
            scheme = "https" if settings.tls else "http"
            tls += f", metrics on {scheme}://{self.metrics.address}/metrics"
        log.info(
            "chronoplane %s serving on %s%s (instance %s %s, %s, %d jobs scheduled, database %s)",
            _version(),
            server.address,
            tls,
            settings.instance_name or socket.gethostname(),
            self.instance_id,
            ("leader" if leading else "follower")
            + (
                ", credentials required"
                if settings.auth_required()
                else ", no credentials required"
            ),
            member.scheduled if leading else 0,
            _redacted(settings.database_url),
        )

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
            except Exception as error:
                failure(log, "purging execution history failed; trying again later", error)
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
            except Exception as error:
                failure(log, "purging watch events failed; trying again later", error)
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
