"""The audit log: one record per call of a mutating RPC, allowed or refused (decision 0013);
a BatchCreateJobs that creates jobs is recorded as one record per job (decision 0017).

Outermost of the interceptors, so that it sees how every call ended, refusals by the
authentication check included. The record is written before the response is sent: a client
that got an answer finds its call in ListAuditEvents.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format

from chronoplane.server.aio import GroupCommit, in_turns
from chronoplane.server.logs import failure
from chronoplane.server.models import AuditEvent, JSONObject
from chronoplane.server.security import MUTATING_RPCS, current_identity
from chronoplane.server.transport.errors import PerMethod

__all__ = ["AuditInterceptor"]

SCHEDULER_SERVICE = "chronoplane.v1.SchedulerService"
# A request's JSON is kept whole up to this size; beyond, its larger values are replaced by
# their size (a job's args can be 64 KiB).
MAX_REQUEST_JSON = 16 * 1024
MAX_VALUE_JSON = 4 * 1024
MAX_MESSAGE = 4 * 1024

log = logging.getLogger(__name__)

Record = Callable[[Sequence[AuditEvent]], Awaitable[None]]


def _bounded(value: Any, limit: int) -> Any:
    if _size(value, limit) <= limit:
        return value
    if isinstance(value, dict):
        return {key: _bounded(item, MAX_VALUE_JSON) for key, item in value.items()}
    return f"(over {limit:,} bytes, not kept)"


def _size(value: Any, limit: int) -> int:
    """About how long ``value`` is as JSON; it stops counting past ``limit`` (a refused
    request may be 4 MiB: measuring it whole at every level cost 100 ms a call)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        total = 2
        for key, item in value.items():
            total += len(key) + 4 + _size(item, limit - total)
            if total > limit:
                break
        return total
    if isinstance(value, list):
        total = 2
        for item in value:
            total += 1 + _size(item, limit - total)
            if total > limit:
                break
        return total
    return len(json.dumps(value))


def request_json(request: Any) -> JSONObject:
    """The request as proto3 JSON, bounded; a part that has no JSON form (a NaN in args, a
    field mask path that is not snake_case) is a placeholder saying why, the rest is kept."""
    try:
        body = json_format.MessageToDict(request)
    except Exception:  # SerializeToJsonError, ValueError: whatever the printer refuses
        body = _fields_json(request)
    bounded: JSONObject = _bounded(body, MAX_REQUEST_JSON)
    return bounded


def _fields_json(message: Any) -> dict[str, Any]:
    """``message`` as JSON field by field, descending into the fields that fail."""
    body: dict[str, Any] = {}
    for field, value in message.ListFields():
        alone = type(message)()
        alone.MergeFrom(message)
        for other, _ in alone.ListFields():
            if other.name != field.name:
                alone.ClearField(other.name)
        try:
            body.update(json_format.MessageToDict(alone))
            continue
        except Exception as error:
            reason = str(error)
        name = _json_name(field.name)
        nested = field.type == field.TYPE_MESSAGE and not field.is_repeated
        if nested and value.DESCRIPTOR.file.package != "google.protobuf":
            body[name] = _fields_json(value)
        else:
            body[name] = f"(not representable as JSON: {reason})"
    return body


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _text(value: str) -> str:
    """A string PostgreSQL can store: a refused request may have carried NUL characters."""
    return value.replace("\x00", "\\x00")


def _outcome(context: Any, default: str) -> tuple[str, str]:
    """The status code's name and details the call ends with."""
    status = context.code()
    if not isinstance(status, grpc.StatusCode):
        return default, ""
    return status.name, (context.details() or "") if status is not grpc.StatusCode.OK else ""


def _subjects(rpc: str, request: Any, response: Any) -> tuple[str, str]:
    """The job and the execution a call was about (or made)."""
    if rpc == "CreateJob":
        return (response.job.id if response is not None else request.job.id), ""
    if rpc == "UpdateJob":
        return request.job.id, ""
    if rpc == "BatchCreateJobs":  # refused: about no one job
        return "", ""
    if rpc == "PurgeExecutions":
        return request.job_id, ""
    if rpc == "CancelExecution":
        return (response.execution.job_id if response is not None else ""), request.id
    if rpc == "TriggerJob":
        return request.id, (response.execution.id if response is not None else "")
    return request.id, ""


class AuditInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, record: Record, *, instance_id: str) -> None:
        self._record = record
        # The records of concurrent calls share a transaction.
        self._commits: GroupCommit[Sequence[AuditEvent], None] = GroupCommit(
            self._record_together, name="audit-records", alone=()
        )
        self._instance_id = instance_id
        self._pending: set[asyncio.Task[None]] = set()
        self._wrapped = PerMethod()

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return self._wrapped.get(method, handler, lambda: self._recorded(method, handler))

    def _recorded(self, method: str, handler: Any) -> Any:
        service, _, rpc = method.lstrip("/").partition("/")
        if service != SCHEDULER_SERVICE or rpc not in MUTATING_RPCS:
            return handler
        if handler.request_streaming or handler.response_streaming:
            raise NotImplementedError(f"{rpc}: only unary mutating RPCs are audited")
        return grpc.experimental.wrap_server_method_handler(
            lambda behaviour: self._audited(rpc, behaviour), handler
        )

    def _audited(self, rpc: str, behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            current_identity.set(None)
            response = None
            code, message = "OK", ""
            try:
                response = await behaviour(request, context)
                # A refusal ends the call with a status set on the context (errors.end_with).
                code, message = _outcome(context, "OK")
                return response
            except grpc.aio.AbortError:
                code, message = _outcome(context, "UNKNOWN")
                raise
            except asyncio.CancelledError:
                # The client went away; record it without delaying the cancellation.
                code = "CANCELLED"
                subjects = _subjects(rpc, request, None)
                events = [self._event(rpc, request, context, code, "", subjects=subjects)]
                task = asyncio.create_task(self._write(events))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                raise
            except Exception as error:
                code, message = "INTERNAL", type(error).__name__
                raise
            finally:
                if code != "CANCELLED":
                    events = await self._events(rpc, request, response, context, code, message)
                    await self._write(events)

        return call

    async def _events(
        self, rpc: str, request: Any, response: Any, context: Any, code: str, message: str
    ) -> list[AuditEvent]:
        if rpc == "BatchCreateJobs" and response is not None:
            # Each job as if it had been its own CreateJob, in the order of the requests; in
            # turns, as a thousand requests' JSON would hold the loop for a few hundred ms.
            pairs = zip(request.requests, response.jobs, strict=True)
            return [
                self._event(rpc, entry, context, code, message, subjects=(job.id, ""))
                async for entry, job in in_turns(pairs)
            ]
        subjects = _subjects(rpc, request, response)
        return [self._event(rpc, request, context, code, message, subjects=subjects)]

    def _event(
        self,
        rpc: str,
        request: Any,
        context: Any,
        code: str,
        message: str,
        *,
        subjects: tuple[str, str],
    ) -> AuditEvent:
        identity = current_identity.get()
        job_id, execution_id = subjects
        return AuditEvent(
            time=datetime.now(UTC),
            principal=identity.principal if identity is not None else "unauthenticated",
            role=identity.role.name.lower() if identity is not None else "",
            rpc=rpc,
            job_id=_text(job_id)[:128],
            execution_id=_text(execution_id)[:32],
            code=code,
            message=_text(message)[:MAX_MESSAGE],
            request=request_json(request),
            instance_id=self._instance_id,
            peer=_text(context.peer() or "")[:256],
        )

    async def _record_together(self, calls: list[Sequence[AuditEvent]]) -> list[None]:
        await self._record([event for events in calls for event in events])
        return [None] * len(calls)

    async def _write(self, events: Sequence[AuditEvent]) -> None:
        try:
            await self._commits.submit(events)
        except Exception as error:
            first = events[0]
            failure(
                log,
                f"the audit events ({len(events)}) of {first.rpc} by {first.principal} "
                f"({first.code}) could not be written",
                error,
            )
