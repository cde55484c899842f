"""ProtoClient: one method per SchedulerService call, plain Python in, protobuf messages out.

chronoctl prints what it returns (proto3 JSON, as grpcurl does); the SDK's AsyncClient and
Client (chronoplane.client) call it and convert the messages to dataclasses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Self

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from chronoplane.client._convert import (
    Misfire,
    Overlap,
    execution_states,
    from_timestamp,
    struct,
    timestamp,
    trigger_message,
)
from chronoplane.client._requests import (
    RENAMED,
    create_request,
    job_message,
    overlap_value,
    with_celery,
)
from chronoplane.client.errors import error_info, from_rpc_error
from chronoplane.client.models import CeleryOptions, ExecutionState, RetryPolicy, Trigger
from chronoplane.v1 import (
    audit_pb2,
    execution_pb2,
    instance_pb2,
    job_pb2,
    scheduler_service_pb2_grpc,
)
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["ProtoClient"]


# The most a list call returns per page; lists page through the server with this.
_PAGE_SIZE = 1000


class ProtoClient:
    """A connection to a Chronoplane server whose calls return chronoplane.v1 messages.

    It takes what :class:`chronoplane.client.AsyncClient` takes (which calls it and converts
    the messages to dataclasses); its docstring explains the arguments and a job's settings.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        interceptors: list[Any] | None = (
            [_BearerUnary(token), _BearerStream(token)] if token else None
        )
        self._tls = bool(tls or tls_ca or tls_cert)
        if self._tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self._channel = grpc.aio.secure_channel(address, credentials, interceptors=interceptors)
        else:
            self._channel = grpc.aio.insecure_channel(address, interceptors=interceptors)
        self._stub = scheduler_service_pb2_grpc.SchedulerServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        await self._channel.close()

    async def _call(self, rpc: Any, request: Message) -> Any:
        try:
            return await rpc(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, tls=self._tls) from error

    async def _pages(self, rpc: Any, request: Any, field: str, limit: int | None) -> list[Any]:
        """Every item of a list call (at most ``limit``), following page tokens."""
        items: list[Any] = []
        while limit is None or len(items) < limit:
            request.page_size = _PAGE_SIZE if limit is None else min(limit - len(items), _PAGE_SIZE)
            response = await self._call(rpc, request)
            items += getattr(response, field)
            request.page_token = response.next_page_token
            if not request.page_token:
                break
        return items

    # -- jobs -------------------------------------------------------------------------------------

    async def create_job(
        self,
        job_id: str = "",
        *,
        task: str,
        trigger: Trigger | job_pb2.Trigger,
        args: Mapping[str, Any] | None = None,
        display_name: str = "",
        description: str = "",
        paused: bool = False,
        misfire_grace: timedelta | float | None = None,
        misfire_policy: Misfire | None = None,
        catchup_window: timedelta | float | None = None,
        catchup_limit: int = 0,
        overlap_policy: Overlap | None = None,
        max_concurrent: int = 0,
        retry: RetryPolicy | job_pb2.RetryPolicy | None = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - the job's, not the call's
        history_limit: int = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str = "",
        coalesce: bool | None = None,
        celery: CeleryOptions | job_pb2.CeleryOptions | None = None,
    ) -> job_pb2.Job:
        """Creates a job (the server picks its id when ``job_id`` is empty) and returns it.

        ``trigger`` comes from :func:`cron`, :func:`every` or :func:`at` (which also take the
        trigger's bounds and jitter); the policies are explained in the class's docstring.
        ``coalesce`` is deprecated: use ``misfire_policy`` (``coalesce=False`` is
        ``misfire_policy="run_all"``).
        """
        job = job_message(
            job_id,
            task=task,
            trigger=trigger,
            args=args,
            display_name=display_name,
            description=description,
            paused=paused,
            misfire_grace=misfire_grace,
            coalesce=coalesce,
            max_concurrent=max_concurrent,
            labels=labels,
            misfire=misfire_policy,
            catchup_window=catchup_window,
            catchup_limit=catchup_limit,
            overlap=overlap_policy,
            retry=retry,
            timeout=timeout,
            history_limit=history_limit,
        )
        request = pb.CreateJobRequest(job=with_celery(job, celery), request_id=request_id)
        response: pb.CreateJobResponse = await self._call(self._stub.CreateJob, request)
        return response.job

    async def batch_create_jobs(
        self, jobs: Iterable[Mapping[str, Any] | job_pb2.Job | pb.CreateJobRequest]
    ) -> list[job_pb2.Job]:
        """Creates up to 1,000 jobs in one call, all or none, and returns them in order.

        Each job is a mapping of the keyword arguments :meth:`create_job` takes (``job_id``
        and ``request_id`` included), or a ``chronoplane.v1`` Job or CreateJobRequest::

            await client.batch_create_jobs(
                [
                    {"job_id": "a", "task": "reports.daily", "trigger": cron("0 6 * * *")},
                    {"job_id": "b", "task": "reports.daily", "trigger": every(3600)},
                ]
            )

        If any job is refused, none is created: :class:`InvalidArgument` names each bad
        field as ``requests[i].job.<field>`` (a repeated id too); :class:`AlreadyExists`
        names a taken id in its message. An entry whose ``request_id`` created a job before
        returns that job, so a retried batch returns the same jobs.
        """
        requests = [create_request(job) for job in jobs]
        response: pb.BatchCreateJobsResponse = await self._call(
            self._stub.BatchCreateJobs, pb.BatchCreateJobsRequest(requests=requests)
        )
        return list(response.jobs)

    async def get_job(self, job_id: str) -> job_pb2.Job:
        response: pb.GetJobResponse = await self._call(
            self._stub.GetJob, pb.GetJobRequest(id=job_id)
        )
        return response.job

    async def list_jobs(self, *, limit: int | None = None) -> list[job_pb2.Job]:
        """Every job (or the first ``limit``), by id."""
        return await self._pages(self._stub.ListJobs, pb.ListJobsRequest(), "jobs", limit)

    async def update_job(
        self,
        job_id: str,
        *,
        etag: str = "",
        task: str | None = None,
        trigger: Trigger | job_pb2.Trigger | None = None,
        args: Mapping[str, Any] | None = None,
        display_name: str | None = None,
        description: str | None = None,
        misfire_grace: timedelta | float | None = None,
        misfire_policy: Misfire | None = None,
        catchup_window: timedelta | float | None = None,
        catchup_limit: int | None = None,
        overlap_policy: Overlap | None = None,
        max_concurrent: int | None = None,
        retry: RetryPolicy | job_pb2.RetryPolicy | None = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - the job's, not the call's
        history_limit: int | None = None,
        labels: Mapping[str, str] | None = None,
        coalesce: bool | None = None,
    ) -> job_pb2.Job:
        """Changes the fields given (those not None) and returns the job as stored.

        The fields mean what they mean in :meth:`create_job`. To remove a setting, give its
        "none" value: ``catchup_window=0``, ``timeout=0``, ``history_limit=0``,
        ``retry=retry_policy(1)``. ``coalesce`` is deprecated: use ``misfire_policy``.
        """
        changes: dict[str, Any] = {
            "task": task,
            "trigger": trigger,
            "args": args,
            "display_name": display_name,
            "description": description,
            "misfire_grace": misfire_grace,
            "coalesce": coalesce,
            "max_concurrent": max_concurrent,
            "labels": labels,
            "misfire_policy": misfire_policy,
            "catchup_window": catchup_window,
            "catchup_limit": catchup_limit,
            "overlap_policy": overlap_policy,
            "retry": retry,
            "timeout": timeout,
            "history_limit": history_limit,
        }
        job = job_message(job_id, etag=etag, **{RENAMED.get(k, k): v for k, v in changes.items()})
        mask = field_mask_pb2.FieldMask(paths=[k for k, v in changes.items() if v is not None])
        request = pb.UpdateJobRequest(job=job, update_mask=mask)
        response: pb.UpdateJobResponse = await self._call(self._stub.UpdateJob, request)
        return response.job

    async def update_job_fields(self, job: job_pb2.Job, fields: Iterable[str]) -> job_pb2.Job:
        """Sets the named fields (UpdateJob's update_mask paths) to their values in ``job``,
        a Job message with the id set (and the etag, to change it only if it has not changed
        since); returns the job as stored."""
        mask = field_mask_pb2.FieldMask(paths=list(fields))
        request = pb.UpdateJobRequest(job=job, update_mask=mask)
        response: pb.UpdateJobResponse = await self._call(self._stub.UpdateJob, request)
        return response.job

    async def delete_job(self, job_id: str, *, etag: str = "") -> None:
        """Deletes a job and its execution history; a non-empty etag must match."""
        await self._call(self._stub.DeleteJob, pb.DeleteJobRequest(id=job_id, etag=etag))

    async def pause_job(self, job_id: str, *, etag: str = "") -> job_pb2.Job:
        response: pb.PauseJobResponse = await self._call(
            self._stub.PauseJob, pb.PauseJobRequest(id=job_id, etag=etag)
        )
        return response.job

    async def resume_job(self, job_id: str, *, etag: str = "") -> job_pb2.Job:
        response: pb.ResumeJobResponse = await self._call(
            self._stub.ResumeJob, pb.ResumeJobRequest(id=job_id, etag=etag)
        )
        return response.job

    async def trigger_job(
        self,
        job_id: str,
        *,
        args: Mapping[str, Any] | None = None,
        request_id: str = "",
        overlap_policy: Overlap | None = None,
    ) -> execution_pb2.Execution:
        """Runs a job now (with ``args`` instead of its own, if given); returns the execution.

        ``overlap_policy`` (see :meth:`create_job`) replaces the job's for this run when
        ``max_concurrent`` runs are going; ``"allow"`` starts it even beyond that.
        """
        request = pb.TriggerJobRequest(
            id=job_id,
            args=struct(args) if args is not None else None,
            request_id=request_id,
            overlap_policy=overlap_value(overlap_policy),
        )
        response: pb.TriggerJobResponse = await self._call(self._stub.TriggerJob, request)
        return response.execution

    async def backfill_job(
        self,
        job_id: str,
        *,
        start: datetime,
        end: datetime,
        overlap_policy: Overlap | None = None,
    ) -> pb.BackfillJobResponse:
        """Runs the fires the job's trigger had in [start, end), a past range, oldest first,
        with source BACKFILL; a fire backfilled before is not run again.

        Returns the response: ``executions`` holds the executions created, and
        ``already_backfilled`` how many fires of the range had been backfilled before.
        ``overlap_policy`` (default ``"buffer_all"``: one after another, as ``max_concurrent``
        allows) says what a fire does when the job's runs are all taken.
        """
        request = pb.BackfillJobRequest(
            id=job_id,
            start_time=timestamp(start),
            end_time=timestamp(end),
            overlap_policy=overlap_value(overlap_policy),
        )
        response: pb.BackfillJobResponse = await self._call(self._stub.BackfillJob, request)
        return response

    # -- executions and the rest ------------------------------------------------------------------

    async def get_execution(self, execution_id: str) -> execution_pb2.Execution:
        response: pb.GetExecutionResponse = await self._call(
            self._stub.GetExecution, pb.GetExecutionRequest(id=execution_id)
        )
        return response.execution

    async def list_executions(
        self,
        *,
        job_id: str = "",
        states: Iterable[ExecutionState | str | int] = (),
        scheduled_after: datetime | None = None,
        scheduled_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[execution_pb2.Execution]:
        """Executions, newest first: every one matching (or the first ``limit``)."""
        request = pb.ListExecutionsRequest(
            job_id=job_id,
            states=execution_states(states),
            scheduled_after=timestamp(scheduled_after) if scheduled_after else None,
            scheduled_before=timestamp(scheduled_before) if scheduled_before else None,
        )
        return await self._pages(self._stub.ListExecutions, request, "executions", limit)

    async def cancel_execution(
        self, execution_id: str, *, reason: str = ""
    ) -> execution_pb2.Execution:
        """Stops a PENDING or RUNNING execution, which ends CANCELLED (``reason`` goes into its
        error message), and returns it. An execution already in a final state raises
        :class:`FailedPrecondition` with reason ``"EXECUTION_FINISHED"``.
        """
        request = pb.CancelExecutionRequest(id=execution_id, reason=reason)
        response: pb.CancelExecutionResponse = await self._call(self._stub.CancelExecution, request)
        return response.execution

    async def purge_executions(
        self, *, job_id: str = "", older_than: datetime | None = None, keep_last: int = 0
    ) -> int:
        """Deletes finished executions (of one job, or of every job) that ended before
        ``older_than``, or all but each job's newest ``keep_last``; returns how many.

        At least one of ``older_than`` and ``keep_last`` is required. PENDING and RUNNING
        executions are never deleted.
        """
        request = pb.PurgeExecutionsRequest(
            job_id=job_id,
            older_than=timestamp(older_than) if older_than else None,
            keep_last=keep_last,
        )
        response: pb.PurgeExecutionsResponse = await self._call(self._stub.PurgeExecutions, request)
        return response.purged_count

    # -- watches ----------------------------------------------------------------------------------

    def watch_executions(
        self,
        *,
        job_ids: Iterable[str] = (),
        states: Iterable[ExecutionState | str | int] = (),
        labels: Mapping[str, str] | None = None,
        after_cursor: int | None = None,
        snapshot: bool = False,
        resume: bool = True,
    ) -> AsyncGenerator[pb.WatchExecutionsResponse, None]:
        """Execution events as the cluster commits them, until the caller stops iterating.

        With ``resume`` (the default), a stream the server ends (it shuts down or dies:
        UNAVAILABLE; this client fell behind: RESOURCE_EXHAUSTED) is opened again after the
        last cursor received, on the same address: no event is lost or repeated, as long as
        the gap is shorter than the server's event retention. Other errors are raised.
        """
        request = pb.WatchExecutionsRequest(
            job_ids=list(job_ids),
            states=execution_states(states),
            labels=dict(labels or {}),
            snapshot=snapshot,
        )
        if after_cursor is not None:
            request.after_cursor = after_cursor
        return self._watch(self._stub.WatchExecutions, request, resume)

    def watch_jobs(
        self,
        *,
        job_ids: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        after_cursor: int | None = None,
        snapshot: bool = False,
        resume: bool = True,
    ) -> AsyncGenerator[pb.WatchJobsResponse, None]:
        """Job events (added, modified, deleted); see :meth:`watch_executions`."""
        request = pb.WatchJobsRequest(
            job_ids=list(job_ids), labels=dict(labels or {}), snapshot=snapshot
        )
        if after_cursor is not None:
            request.after_cursor = after_cursor
        return self._watch(self._stub.WatchJobs, request, resume)

    async def _watch(
        self, rpc: Callable[..., Any], request: Any, resume: bool
    ) -> AsyncGenerator[Any, None]:
        delay = 0.1
        while True:
            call = rpc(request)
            try:
                async for event in call:
                    if event.kind != pb.WATCH_EVENT_KIND_SNAPSHOT:
                        # From here on a reopened stream continues (a snapshot cut short is
                        # taken again: its items all carry the cursor it is read at).
                        request.after_cursor = event.cursor
                        request.snapshot = False
                    delay = 0.1
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                resumable = error.code() == grpc.StatusCode.UNAVAILABLE or (
                    info is not None and info.reason == "WATCH_FELL_BEHIND"
                )
                if not resume or not resumable:
                    raise from_rpc_error(error, tls=self._tls) from error
                fresh = not request.HasField("after_cursor") and not request.snapshot
                if fresh and info is not None and "cursor" in info.metadata:
                    request.after_cursor = int(info.metadata["cursor"])
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def list_instances(self) -> list[instance_pb2.Instance]:
        """The server processes sharing the database, oldest first; ``leader`` marks the one
        whose timer fires jobs."""
        response: pb.ListInstancesResponse = await self._call(
            self._stub.ListInstances, pb.ListInstancesRequest()
        )
        return list(response.instances)

    async def list_audit_events(
        self,
        *,
        principal: str = "",
        rpc: str = "",
        job_id: str = "",
        execution_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int | None = None,
    ) -> list[audit_pb2.AuditEvent]:
        """The audit log of mutating calls, newest first (admin only): every event matching,
        or the first ``limit``."""
        request = pb.ListAuditEventsRequest(
            principal=principal,
            rpc=rpc,
            job_id=job_id,
            execution_id=execution_id,
            start_time=timestamp(start_time) if start_time else None,
            end_time=timestamp(end_time) if end_time else None,
        )
        return await self._pages(self._stub.ListAuditEvents, request, "audit_events", limit)

    async def list_tasks(self) -> list[job_pb2.Task]:
        """The tasks registered on the server, by name."""
        response: pb.ListTasksResponse = await self._call(
            self._stub.ListTasks, pb.ListTasksRequest()
        )
        return list(response.tasks)

    async def preview_trigger(
        self,
        trigger: Trigger | job_pb2.Trigger,
        *,
        count: int = 0,
        start_time: datetime | None = None,
    ) -> list[datetime]:
        """The next ``count`` (0 means 10) fire times of a trigger after start_time (or now)."""
        request = pb.PreviewTriggerRequest(
            trigger=trigger_message(trigger),
            count=count,
            start_time=timestamp(start_time) if start_time else None,
        )
        response: pb.PreviewTriggerResponse = await self._call(self._stub.PreviewTrigger, request)
        return [from_timestamp(t) for t in response.fire_times]


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements: one class each.
class _BearerUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _BearerStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)
