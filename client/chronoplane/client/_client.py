"""AsyncClient: one method per SchedulerService call, plain Python in, protobuf messages out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Self

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from chronoplane.client._convert import duration, from_timestamp, struct, timestamp
from chronoplane.client.errors import from_rpc_error
from chronoplane.v1 import execution_pb2, job_pb2, scheduler_service_pb2_grpc
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["AsyncClient"]


# The most a list call returns per page; lists page through the server with this.
_PAGE_SIZE = 1000


def _job(
    job_id: str,
    *,
    etag: str = "",
    task: str | None = None,
    trigger: job_pb2.Trigger | None = None,
    args: Mapping[str, Any] | None = None,
    display_name: str | None = None,
    description: str | None = None,
    paused: bool = False,
    misfire_grace: timedelta | None = None,
    coalesce: bool | None = None,
    max_concurrent: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> job_pb2.Job:
    return job_pb2.Job(
        id=job_id,
        etag=etag,
        task=task or "",
        trigger=trigger,
        args=struct(args) if args is not None else None,
        display_name=display_name or "",
        description=description or "",
        paused=paused,
        misfire_grace=duration(misfire_grace) if misfire_grace is not None else None,
        coalesce=coalesce,
        max_concurrent=max_concurrent or 0,
        labels=labels,
    )


class AsyncClient:
    """A connection to a Chronoplane server, to use as ``async with AsyncClient(address)``.

    ``timeout`` bounds each call, in seconds (None waits for ever). A failed call raises a
    subclass of :class:`chronoplane.client.errors.ChronoplaneError`.
    """

    def __init__(self, address: str, *, timeout: float | None = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address)
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
            raise from_rpc_error(error) from error

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
        trigger: job_pb2.Trigger,
        args: Mapping[str, Any] | None = None,
        display_name: str = "",
        description: str = "",
        paused: bool = False,
        misfire_grace: timedelta | None = None,
        coalesce: bool | None = None,
        max_concurrent: int = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> job_pb2.Job:
        """Creates a job (the server picks its id when ``job_id`` is empty) and returns it."""
        job = _job(
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
        )
        request = pb.CreateJobRequest(job=job, request_id=request_id)
        response: pb.CreateJobResponse = await self._call(self._stub.CreateJob, request)
        return response.job

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
        trigger: job_pb2.Trigger | None = None,
        args: Mapping[str, Any] | None = None,
        display_name: str | None = None,
        description: str | None = None,
        misfire_grace: timedelta | None = None,
        coalesce: bool | None = None,
        max_concurrent: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> job_pb2.Job:
        """Changes the fields given (those not None) and returns the job as stored."""
        changes = {
            "task": task,
            "trigger": trigger,
            "args": args,
            "display_name": display_name,
            "description": description,
            "misfire_grace": misfire_grace,
            "coalesce": coalesce,
            "max_concurrent": max_concurrent,
            "labels": labels,
        }
        job = _job(
            job_id,
            etag=etag,
            task=task,
            trigger=trigger,
            args=args,
            display_name=display_name,
            description=description,
            misfire_grace=misfire_grace,
            coalesce=coalesce,
            max_concurrent=max_concurrent,
            labels=labels,
        )
        mask = field_mask_pb2.FieldMask(paths=[k for k, v in changes.items() if v is not None])
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
        self, job_id: str, *, args: Mapping[str, Any] | None = None, request_id: str = ""
    ) -> execution_pb2.Execution:
        """Runs a job now (with ``args`` instead of its own, if given); returns the execution."""
        request = pb.TriggerJobRequest(
            id=job_id, args=struct(args) if args is not None else None, request_id=request_id
        )
        response: pb.TriggerJobResponse = await self._call(self._stub.TriggerJob, request)
        return response.execution

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
        states: Iterable[execution_pb2.ExecutionState.ValueType] = (),
        scheduled_after: datetime | None = None,
        scheduled_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[execution_pb2.Execution]:
        """Executions, newest first: every one matching (or the first ``limit``)."""
        request = pb.ListExecutionsRequest(
            job_id=job_id,
            states=states,
            scheduled_after=timestamp(scheduled_after) if scheduled_after else None,
            scheduled_before=timestamp(scheduled_before) if scheduled_before else None,
        )
        return await self._pages(self._stub.ListExecutions, request, "executions", limit)

    async def list_tasks(self) -> list[job_pb2.Task]:
        """The tasks registered on the server, by name."""
        response: pb.ListTasksResponse = await self._call(
            self._stub.ListTasks, pb.ListTasksRequest()
        )
        return list(response.tasks)

    async def preview_trigger(
        self, trigger: job_pb2.Trigger, *, count: int = 0, start_time: datetime | None = None
    ) -> list[datetime]:
        """The next ``count`` (0 means 10) fire times of a trigger after start_time (or now)."""
        request = pb.PreviewTriggerRequest(
            trigger=trigger,
            count=count,
            start_time=timestamp(start_time) if start_time else None,
        )
        response: pb.PreviewTriggerResponse = await self._call(self._stub.PreviewTrigger, request)
        return [from_timestamp(t) for t in response.fire_times]
