"""Watches: one reader of the event history per instance, fanned out to every stream.

The hub reads events after its position whenever it is woken (an event committed here, a
``NOTIFY`` from another instance, the listener reconnecting) and at least every
``poll_interval``; the table is the truth, wake-ups only make it read sooner. Each event goes,
as one shared object, into the buffer of every watcher whose filter it matches. While nobody
watches, it reads nothing; the first watcher moves it to the newest cursor.

A buffer is bounded. A watcher whose buffer is full stops receiving from the hub and
*catches up* from the table instead, from the last event it sent, until it reaches the hub's
position and rejoins: a burst or a slow reader costs reads, not memory, and holds no one up.
A watcher that is behind like this and has not got a single message out to its client for
``stall_timeout`` (a client that stopped reading) is ended (``WatchFellBehind``, with the
cursor to resume from). A stream that resumes from a cursor starts out catching up. See
docs/decisions/0011-watch-events.md.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from chronoplane.server import metrics
from chronoplane.server.errors import CursorOutOfRange, TooManyWatchers
from chronoplane.server.logs import Outage, brief
from chronoplane.server.models import (
    Event,
    EventResource,
    EventWindow,
    Execution,
    ExecutionState,
    Job,
    SnapshotPoint,
)
from chronoplane.server.storage.abc import Store

__all__ = [
    "WATCH_KINDS",
    "Notice",
    "NoticeKind",
    "StopReason",
    "StreamControl",
    "WatchFilter",
    "WatchHub",
]

log = logging.getLogger(__name__)

# The watch metrics' kind label of each resource (metrics.py).
WATCH_KINDS = {EventResource.EXECUTION: "executions", EventResource.JOB: "jobs"}
_OPEN = {resource: metrics.WATCHERS_OPEN.labels(kind) for resource, kind in WATCH_KINDS.items()}

# How soon the hub reads again while events are being written past what it could read.
BEHIND_POLL_SECONDS = 0.05

# Events read back from the table for streams catching up, kept to be shared: two pages.
READ_BACK_KEPT = 2000


class NoticeKind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    SNAPSHOT_END = "snapshot_end"
    PROGRESS = "progress"


@dataclass(frozen=True, kw_only=True, eq=False)
class Notice:
    """What a stream sends besides changes: a snapshot item, its end, or progress."""

    cursor: int
    kind: NoticeKind
    execution: Execution | None = None
    job: Job | None = None


@dataclass(frozen=True, kw_only=True)
class WatchFilter:
    """Which events a stream wants; empty parts match everything."""

    resource: EventResource
    job_ids: frozenset[str] = frozenset()
    states: frozenset[ExecutionState] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, event: Event) -> bool:
        if event.resource != self.resource:
            return False
        if self.job_ids and event.job_id not in self.job_ids:
            return False
        if self.states:
            if event.execution is None or event.execution.state not in self.states:
                return False
        return self.matches_labels(event.labels)

    def matches_labels(self, labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.labels)


class StopReason(enum.StrEnum):
    FELL_BEHIND = "fell_behind"
    SERVER_STOPPING = "server_stopping"


class StreamControl:
    """The transport's handle on one stream: ``stop`` ends it at once (cancelling the task,
    which may be waiting for a client that does not read) when its buffer overflows or the
    server stops; ``start`` is the cursor it began after (a point to resume from before
    anything was sent); ``peer`` is who watches, for the log."""

    def __init__(self, task: asyncio.Task[Any] | None = None, *, peer: str = "") -> None:
        self.start: int | None = None
        self.stopped: StopReason | None = None
        self.peer = peer or "a client"
        self.began = time.monotonic()
        self._task = task

    def stop(self, reason: StopReason) -> None:
        if self.stopped is None:
            self.stopped = reason
            if self._task is not None:
                self._task.cancel()


class _Watcher:
    __slots__ = ("active", "behind", "buffer", "control", "filter", "ready")

    def __init__(self, watch_filter: WatchFilter, control: StreamControl) -> None:
        self.filter = watch_filter
        self.buffer: deque[Event] = deque()
        self.ready = asyncio.Event()
        # Not fed by the hub: reads the table until it is back at the hub's position.
        self.behind = False
        # When it last got a message out (or started).
        self.active = time.monotonic()
        self.control = control


WatchItem = Event | Notice


class WatchHub:
    def __init__(
        self,
        store: Store,
        *,
        buffer: int = 1000,
        max_watchers: int = 2000,
        progress_interval: float = 5.0,
        poll_interval: float = 1.0,
        page: int = 1000,
        stall_timeout: float | None = None,
        recent: int = 1024,
        coalesce: float = 0.005,
    ) -> None:
        self._store = store
        self._buffer = buffer
        self._max_watchers = max_watchers
        self._progress_interval = progress_interval
        self._poll_interval = poll_interval
        self._page = page
        # The newest events dispatched, in cursor order, between recent and 2 x recent. Few:
        # each is a dozen objects for every full garbage collection to scan.
        self._recent: list[Event] = []
        self._recent_size = recent
        # Events read back from the table by streams catching up, by cursor: each is one
        # object for all of them, decoded and encoded once however many streams it goes to;
        # let go of once no stream catches up.
        self._read_back: dict[int, Event] = {}
        self._catching_up = 0
        self._coalesce = coalesce
        self._stall_timeout = stall_timeout if stall_timeout is not None else 2 * progress_interval
        # The last cursor handed to the watchers: every event up to it was dispatched.
        self._position = 0
        # Nobody watched at the last wake-up, so nothing was read: the position may be old.
        self._idle = False
        self._by_job: dict[tuple[EventResource, str], set[_Watcher]] = {}
        self._everything: dict[EventResource, set[_Watcher]] = {r: set() for r in EventResource}
        self._count = 0
        self._watchers: set[_Watcher] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Rounds of the hub's loop so far (each wake-up, or poll, is one).
        self.rounds = 0

    @property
    def buffer(self) -> int:
        return self._buffer

    @property
    def watchers(self) -> int:
        return self._count

    async def start(self) -> None:
        self._position = (await self._store.event_window()).newest
        self._task = asyncio.create_task(self._tail_forever(), name="watch-hub")

    def close_streams(self) -> None:
        """Ends every stream (the server stops): clients resume on another instance."""
        if self._watchers:
            log.info(
                "ending %d watch streams: the server stops (their clients resume elsewhere)",
                len(self._watchers),
            )
        for watcher in list(self._watchers):
            watcher.control.stop(StopReason.SERVER_STOPPING)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self, _payload: str = "") -> None:
        """Events were committed (here, or by another instance: the payload is unused)."""
        self._wake.set()

    async def _tail_forever(self) -> None:
        outage = Outage(
            log, "reading watch events failed (trying again)", "watch events are read again"
        )
        while True:
            # Writers still in flight past the last read: they end with a commit (which wakes
            # us) or a rollback (which does not), so look again soon either way.
            wait = BEHIND_POLL_SECONDS if self._store.events_behind else self._poll_interval
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            # Commits come in bursts: one read for all of those of the next few ms.
            await asyncio.sleep(self._coalesce)
            self._wake.clear()
            self.rounds += 1
            self._end_stalled()
            try:
                await self._read_new()
                outage.ok()
            except Exception as error:
                outage.failed(error)
                await asyncio.sleep(min(1.0, self._poll_interval))

    async def _read_new(self) -> None:
        if not self._count:
            # Nobody watches: no read at all (an instance without watchers would otherwise
            # pay a query per commit of the cluster). The first watcher moves the position.
            self._idle = True
            return
        while True:
            batch = await self._store.newest_events(self._position, limit=self._page)
            if batch:
                for event in batch:
                    self._dispatch(event)
                self._position = batch[-1].cursor
                self._remember(batch)
            if len(batch) < self._page:
                return

    def _dispatch(self, event: Event) -> None:
        resource = event.resource
        for group in (
            self._everything[resource],
            self._by_job.get((resource, event.job_id), ()),
        ):
            for watcher in group:
                if watcher.behind or not watcher.filter.matches(event):
                    continue
                if len(watcher.buffer) >= self._buffer:
                    watcher.behind = True  # from here on it reads the table
                    log.info(
                        "a watch stream is %d events behind (cursor %d); it catches up from "
                        "the table",
                        self._buffer,
                        event.cursor,
                    )
                else:
                    watcher.buffer.append(event)
                watcher.ready.set()

    def _remember(self, batch: list[Event]) -> None:
        """Keeps the newest ``recent`` events for watchers that catch up."""
        self._recent.extend(batch)
        if len(self._recent) > 2 * self._recent_size:
            del self._recent[: len(self._recent) - self._recent_size]

    def _end_stalled(self) -> None:
        """Ends the streams that are behind and have sent nothing for stall_timeout."""
        now = time.monotonic()
        for watcher in self._watchers:
            if watcher.behind and now - watcher.active > self._stall_timeout:
                watcher.control.stop(StopReason.FELL_BEHIND)

    def _register(self, watcher: _Watcher) -> None:
        if self._count >= self._max_watchers:
            raise TooManyWatchers(self._max_watchers)
        self._count += 1
        _OPEN[watcher.filter.resource].inc()
        self._watchers.add(watcher)
        resource = watcher.filter.resource
        if not watcher.filter.job_ids:
            self._everything[resource].add(watcher)
        for job_id in watcher.filter.job_ids:
            self._by_job.setdefault((resource, job_id), set()).add(watcher)

    def _unregister(self, watcher: _Watcher) -> None:
        self._count -= 1
        _OPEN[watcher.filter.resource].dec()
        self._watchers.discard(watcher)
        resource = watcher.filter.resource
        self._everything[resource].discard(watcher)
        for job_id in watcher.filter.job_ids:
            group = self._by_job.get((resource, job_id))
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._by_job[(resource, job_id)]

    async def watch(
        self,
        watch_filter: WatchFilter,
        *,
        after: int | None = None,
        snapshot: bool = False,
        control: StreamControl | None = None,
    ) -> AsyncIterator[WatchItem]:
        """The stream's items, until the caller stops iterating. Raises ``TooManyWatchers``
        at once, ``CursorOutOfRange`` for a cursor outside the kept history; a stalled
        stream is ended through ``control.stop()``."""
        control = control or StreamControl()
        watcher = _Watcher(watch_filter, control)
        last = await self._join(watcher, after)
        # Events past the snapshot's cursor whose changes it already showed.
        shown: frozenset[int] = frozenset()
        why = "the client went away"
        try:
            if snapshot:
                point, notices = await self._snapshot(watch_filter)
                shown = point.included
                for item in notices:
                    last = item.cursor
                    yield item
                    watcher.active = time.monotonic()
            while True:
                buffer = watcher.buffer
                while buffer:
                    event = buffer.popleft()
                    if event.cursor > last:
                        last = event.cursor
                        if event.cursor not in shown:
                            yield event
                            watcher.active = time.monotonic()
                if watcher.behind:
                    async for event in self._catch_up(watcher, last):
                        last = event.cursor
                        if watch_filter.matches(event) and event.cursor not in shown:
                            yield event
                            watcher.active = time.monotonic()
                    continue
                watcher.ready.clear()
                try:
                    async with asyncio.timeout(self._progress_interval):
                        await watcher.ready.wait()
                except TimeoutError:
                    if not watcher.buffer and not watcher.behind:
                        # Everything up to the hub's position that matched is delivered.
                        last = max(last, self._position)
                        yield Notice(cursor=last, kind=NoticeKind.PROGRESS)
                        watcher.active = time.monotonic()
        except Exception as error:
            why = brief(error)
            raise
        finally:
            self._unregister(watcher)
            self._log_end(watcher, why, last)

    def _log_end(self, watcher: _Watcher, why: str, cursor: int) -> None:
        """One line for a stream that ended (those ended by a stop: close_streams')."""
        control = watcher.control
        if control.stopped is StopReason.SERVER_STOPPING:
            return
        what = f"{watcher.filter.resource.value} watch of {control.peer}"
        lasted = time.monotonic() - control.began
        if control.stopped is StopReason.FELL_BEHIND:
            log.warning(
                "%s ended after %.0f s: it fell behind, and its client read nothing for %g s "
                "(it may resume after cursor %d)",
                what,
                lasted,
                self._stall_timeout,
                cursor,
            )
            return
        log.info("%s ended after %.0f s at cursor %d: %s", what, lasted, cursor, why)

    async def _join(self, watcher: _Watcher, after: int | None) -> int:
        """Registers the watcher; returns the cursor it starts after (events after it reach
        its buffer, unless it is behind: resuming from ``after``, it catches up first)."""
        if after is not None:
            _check_range(after, await self._store.event_window())
            watcher.behind = True
        if self._idle:
            newest = (await self._store.event_window()).newest
            if self._idle and not self._count:
                # The first watcher: skip what nobody was there to see. The recent events
                # must have no gap, so they go too.
                self._position = max(self._position, newest)
                self._recent.clear()
                self._idle = False
        self._register(watcher)
        start = after if after is not None else self._position
        watcher.control.start = start
        return start

    async def _catch_up(self, watcher: _Watcher, after: int) -> AsyncIterator[Event]:
        """The events after ``after``, matching or not (the caller filters, and moves its
        cursor past both), until the watcher is back with the hub: from the hub's recent
        events when they reach back that far (shared, already decoded), else from the table."""
        job_ids = sorted(watcher.filter.job_ids)
        position = after
        self._catching_up += 1
        try:
            while True:
                recent = self._recent
                if recent and position >= recent[0].cursor - 1:
                    chunk = recent[bisect.bisect_right(recent, position, key=_cursor) :]
                    if not chunk:
                        # Nothing dispatched past it: whatever comes next reaches the buffer.
                        watcher.behind = False
                        return
                    for event in chunk:
                        position = event.cursor
                        yield event
                    continue
                batch, window = await self._store.events_after(
                    position, limit=self._page, job_ids=job_ids
                )
                if window.purged_through > position:
                    _check_range(position, window)  # purged while it was behind
                for event in batch:
                    position = event.cursor
                    yield self._read_back.setdefault(event.cursor, event)
                if len(self._read_back) > READ_BACK_KEPT:
                    self._read_back.clear()  # streams further behind decode their own again
                if not batch and self._position <= position:
                    watcher.behind = False
                    return
                if not batch:
                    await asyncio.sleep(0)  # the hub read past the table's reply: read again
        finally:
            self._catching_up -= 1
            if not self._catching_up:
                self._read_back.clear()

    async def _snapshot(self, watch_filter: WatchFilter) -> tuple[SnapshotPoint, list[Notice]]:
        job_ids = sorted(watch_filter.job_ids)
        notices: list[Notice] = []
        if watch_filter.resource is EventResource.EXECUTION:
            point, rows = await self._store.snapshot_executions(job_ids)
            for execution, labels in rows:
                if watch_filter.states and execution.state not in watch_filter.states:
                    continue
                if watch_filter.matches_labels(labels):
                    notices.append(
                        Notice(cursor=point.cursor, kind=NoticeKind.SNAPSHOT, execution=execution)
                    )
        else:
            point, jobs = await self._store.snapshot_jobs(job_ids)
            notices += [
                Notice(cursor=point.cursor, kind=NoticeKind.SNAPSHOT, job=job)
                for job in jobs
                if watch_filter.matches_labels(job.labels)
            ]
        notices.append(Notice(cursor=point.cursor, kind=NoticeKind.SNAPSHOT_END))
        return point, notices


def _cursor(event: Event) -> int:
    return event.cursor


def _check_range(cursor: int, window: EventWindow) -> None:
    if cursor < window.purged_through or cursor > window.newest:
        raise CursorOutOfRange(cursor, oldest=window.purged_through + 1, newest=window.newest)
