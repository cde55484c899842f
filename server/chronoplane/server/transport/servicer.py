"""The SchedulerService RPCs: decode, call one service method, encode."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeAlias

from chronoplane.server import metrics
from chronoplane.server.aio import in_turns
from chronoplane.server.creation import NewJob, check_batch_size
from chronoplane.server.errors import InvalidArgument, ServerStopping, WatchFellBehind
from chronoplane.server.models import AuditQuery, Event, EventKind, EventResource, ExecutionQuery
from chronoplane.server.service import UPDATABLE_FIELDS, SchedulerService
from chronoplane.server.transport.convert import (
    audit_event_to_proto,
    execution_to_proto,
    instance_to_proto,
    job_fields_from_proto,
    job_to_proto,
    overlap_from_proto,
    state_from_proto,
    struct_from_proto,
    task_to_proto,
    timestamp_from_proto,
    timestamp_to_proto,
    trigger_from_proto,
)
from chronoplane.server.watch import (
    WATCH_KINDS,
    Notice,
    NoticeKind,
    StopReason,
    StreamControl,
    WatchItem,
)
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

__all__ = ["SchedulerServicer"]

# grpc ships no type information; the context is a grpc.aio.ServicerContext.
Context: TypeAlias = Any


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    def __init__(self, service: SchedulerService) -> None:
        self._service = service

    async def CreateJob(
        self, request: pb.CreateJobRequest, context: Context
    ) -> pb.CreateJobResponse:
        new = _new_job(request)
        if isinstance(new, InvalidArgument):
            raise new
        job = await self._service.create_job(
            new.values, job_id=new.job_id, paused=new.paused, request_id=new.request_id
        )
        return pb.CreateJobResponse(job=job_to_proto(job))

    async def BatchCreateJobs(
        self, request: pb.BatchCreateJobsRequest, context: Context
    ) -> pb.BatchCreateJobsResponse:
        check_batch_size(len(request.requests))  # before decoding a million entries
        new = [_new_job(entry) async for entry in in_turns(request.requests)]
        jobs = await self._service.batch_create_jobs(new)
        return pb.BatchCreateJobsResponse(jobs=[job_to_proto(job) async for job in in_turns(jobs)])

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_proto(await self._service.get_job(request.id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        page = await self._service.list_jobs(size=request.page_size, token=request.page_token)
        return pb.ListJobsResponse(
            jobs=[job_to_proto(job) for job in page.items], next_page_token=page.next_page_token
        )

    async def UpdateJob(
        self, request: pb.UpdateJobRequest, context: Context
    ) -> pb.UpdateJobResponse:
        paths = set(request.update_mask.paths)
        if "*" in paths:
            paths = set(UPDATABLE_FIELDS)
        if "coalesce" in paths:  # deprecated; misfire_policy says the same
            paths = (paths - {"coalesce"}) | {"misfire_policy"}
        changes = job_fields_from_proto(request.job, paths)
        job = await self._service.update_job(request.job.id, changes, etag=request.job.etag)
        return pb.UpdateJobResponse(job=job_to_proto(job))

    async def DeleteJob(
        self, request: pb.DeleteJobRequest, context: Context
    ) -> pb.DeleteJobResponse:
        await self._service.delete_job(request.id, etag=request.etag)
        return pb.DeleteJobResponse()

    async def PauseJob(self, request: pb.PauseJobRequest, context: Context) -> pb.PauseJobResponse:
        job = await self._service.pause_job(request.id, etag=request.etag)
        return pb.PauseJobResponse(job=job_to_proto(job))

    async def ResumeJob(
        self, request: pb.ResumeJobRequest, context: Context
    ) -> pb.ResumeJobResponse:
        job = await self._service.resume_job(request.id, etag=request.etag)
        return pb.ResumeJobResponse(job=job_to_proto(job))

    async def TriggerJob(
        self, request: pb.TriggerJobRequest, context: Context
    ) -> pb.TriggerJobResponse:
        args = struct_from_proto(request.args, "args") if request.HasField("args") else None
        execution = await self._service.trigger_job(
            request.id,
            args=args,
            request_id=request.request_id,
            overlap_policy=overlap_from_proto(request.overlap_policy, "overlap_policy"),
        )
        return pb.TriggerJobResponse(execution=execution_to_proto(execution))

    async def BackfillJob(
        self, request: pb.BackfillJobRequest, context: Context
    ) -> pb.BackfillJobResponse:
        created, existing = await self._service.backfill_job(
            request.id,
            start=_optional_time(request, "start_time"),
            end=_optional_time(request, "end_time"),
            overlap_policy=overlap_from_proto(request.overlap_policy, "overlap_policy"),
        )
        return pb.BackfillJobResponse(
            executions=[execution_to_proto(e) for e in created], already_backfilled=existing
        )

    async def CancelExecution(
        self, request: pb.CancelExecutionRequest, context: Context
    ) -> pb.CancelExecutionResponse:
        execution = await self._service.cancel_execution(request.id, reason=request.reason)
        return pb.CancelExecutionResponse(execution=execution_to_proto(execution))

    async def PurgeExecutions(
        self, request: pb.PurgeExecutionsRequest, context: Context
    ) -> pb.PurgeExecutionsResponse:
        purged = await self._service.purge_executions(
            job_id=request.job_id,
            older_than=_optional_time(request, "older_than"),
            keep_last=request.keep_last,
        )
        return pb.PurgeExecutionsResponse(purged_count=purged)

    async def GetExecution(
        self, request: pb.GetExecutionRequest, context: Context
    ) -> pb.GetExecutionResponse:
        execution = await self._service.get_execution(request.id)
        return pb.GetExecutionResponse(execution=execution_to_proto(execution))

    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Context
    ) -> pb.ListExecutionsResponse:
        query = ExecutionQuery(
            job_id=request.job_id or None,
            states=frozenset(state_from_proto(s, "states") for s in request.states),
            scheduled_after=_optional_time(request, "scheduled_after"),
            scheduled_before=_optional_time(request, "scheduled_before"),
        )
        page = await self._service.list_executions(
            query, size=request.page_size, token=request.page_token
        )
        return pb.ListExecutionsResponse(
            executions=[execution_to_proto(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(tasks=[task_to_proto(t) for t in self._service.list_tasks()])

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: Context
    ) -> pb.ListInstancesResponse:
        instances = await self._service.list_instances()
        return pb.ListInstancesResponse(instances=[instance_to_proto(i) for i in instances])

    # Streams written with context.write (grpc.aio allows it; the stubs only know generators).
    async def WatchExecutions(  # type: ignore[override]
        self, request: pb.WatchExecutionsRequest, context: Context
    ) -> None:
        control = StreamControl(asyncio.current_task())
        stream = self._service.watch(
            EventResource.EXECUTION,
            job_ids=list(request.job_ids),
            states=frozenset(state_from_proto(s, "states") for s in request.states),
            labels=dict(request.labels),
            after=request.after_cursor if request.HasField("after_cursor") else None,
            snapshot=request.snapshot,
            control=control,
        )
        await _stream(
            stream,
            _execution_event,
            context,
            control,
            self._service.watch_buffer,
            EventResource.EXECUTION,
        )

    async def WatchJobs(  # type: ignore[override]
        self, request: pb.WatchJobsRequest, context: Context
    ) -> None:
        control = StreamControl(asyncio.current_task())
        stream = self._service.watch(
            EventResource.JOB,
            job_ids=list(request.job_ids),
            labels=dict(request.labels),
            after=request.after_cursor if request.HasField("after_cursor") else None,
            snapshot=request.snapshot,
            control=control,
        )
        await _stream(
            stream, _job_event, context, control, self._service.watch_buffer, EventResource.JOB
        )

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        query = AuditQuery(
            principal=request.principal,
            rpc=request.rpc,
            job_id=request.job_id,
            execution_id=request.execution_id,
            after=_optional_time(request, "start_time"),
            before=_optional_time(request, "end_time"),
        )
        page = await self._service.list_audit_events(
            query, size=request.page_size, token=request.page_token
        )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_to_proto(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def PreviewTrigger(
        self, request: pb.PreviewTriggerRequest, context: Context
    ) -> pb.PreviewTriggerResponse:
        fires = self._service.preview_trigger(
            trigger_from_proto(request.trigger, "trigger"),
            count=request.count,
            start=_optional_time(request, "start_time"),
        )
        return pb.PreviewTriggerResponse(
            fire_times=list(filter(None, map(timestamp_to_proto, fires)))
        )


def _new_job(request: pb.CreateJobRequest) -> NewJob | InvalidArgument:
    """The job a CreateJob request asks for, or why it cannot be decoded."""
    try:
        values = job_fields_from_proto(request.job, set(UPDATABLE_FIELDS))
    except InvalidArgument as error:
        return error
    return NewJob(
        values=values,
        job_id=request.job.id,
        paused=request.job.paused,
        request_id=request.request_id,
    )


def _optional_time(request: Any, name: str) -> datetime | None:
    if not request.HasField(name):
        return None
    return timestamp_from_proto(getattr(request, name), name)


class _WatchMetrics:
    """A kind of watch's label children (metrics.py)."""

    def __init__(self, kind: str) -> None:
        self.sent = metrics.WATCH_EVENTS_SENT.labels(kind)
        self.lagging = metrics.WATCHERS_ENDED_LAGGING.labels(kind)

    def delivered(self, item: WatchItem) -> None:
        self.sent.inc()
        committed = getattr(item, "create_time", None)  # events have it, notices not
        if committed is not None:
            metrics.WATCH_EVENT_LAG.observe(max(0.0, time.time() - committed.timestamp()))


_WATCH_METRICS = {resource: _WatchMetrics(kind) for resource, kind in WATCH_KINDS.items()}


async def _stream(
    stream: AsyncIterator[WatchItem],
    encode: Callable[[WatchItem], Any],
    context: Context,
    control: StreamControl,
    buffer: int,
    resource: EventResource,
) -> None:
    sent: int | None = None
    measured = _WATCH_METRICS[resource]
    try:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for item in stream:
                await context.write(encode(item))
                sent = item.cursor
                measured.delivered(item)
    except asyncio.CancelledError:
        if control.stopped is None:
            raise  # the client went away
    else:
        return
    # Ended by the server: say where the client may resume from (what it last got).
    cursor = sent if sent is not None else (control.start or 0)
    if control.stopped is StopReason.SERVER_STOPPING:
        raise ServerStopping(cursor)
    measured.lagging.inc()
    raise WatchFellBehind(cursor, buffer)


_KINDS = {
    EventKind.ADDED: pb.WATCH_EVENT_KIND_ADDED,
    EventKind.MODIFIED: pb.WATCH_EVENT_KIND_MODIFIED,
    EventKind.DELETED: pb.WATCH_EVENT_KIND_DELETED,
    NoticeKind.SNAPSHOT: pb.WATCH_EVENT_KIND_SNAPSHOT,
    NoticeKind.SNAPSHOT_END: pb.WATCH_EVENT_KIND_SNAPSHOT_END,
    NoticeKind.PROGRESS: pb.WATCH_EVENT_KIND_PROGRESS,
}


# One encoding per event, whatever the number of streams it goes to (events and notices
# hash by identity): the wire bytes, which the streams' serializer passes on as they are
# (errors._decoding).
@lru_cache(maxsize=4096)
def _execution_event(item: Event | Notice) -> bytes:
    message = pb.WatchExecutionsResponse(cursor=item.cursor, kind=_KINDS[item.kind])
    if item.execution is not None:
        message.execution.CopyFrom(execution_to_proto(item.execution))
    return message.SerializeToString()


@lru_cache(maxsize=4096)
def _job_event(item: Event | Notice) -> bytes:
    message = pb.WatchJobsResponse(cursor=item.cursor, kind=_KINDS[item.kind])
    if item.job is not None:
        message.job.CopyFrom(job_to_proto(item.job))
    return message.SerializeToString()
