"""The messages AsyncClient sends, built from plain Python: a Job from keyword arguments, a
CreateJob request from them or from a message."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from chronoplane.client._convert import (
    Misfire,
    Overlap,
    celery_message,
    duration,
    misfire_policy,
    overlap_policy,
    retry_message,
    struct,
    trigger_message,
)
from chronoplane.client.models import CeleryOptions, RetryPolicy, Trigger
from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENAMED", "create_request", "job_message", "overlap_value", "with_celery"]


def overlap_value(value: Overlap | None) -> job_pb2.OverlapPolicy.ValueType:
    return overlap_policy(value) if value is not None else job_pb2.OVERLAP_POLICY_UNSPECIFIED


def job_message(
    job_id: str,
    *,
    etag: str = "",
    task: str | None = None,
    trigger: Trigger | job_pb2.Trigger | None = None,
    args: Mapping[str, Any] | None = None,
    display_name: str | None = None,
    description: str | None = None,
    paused: bool = False,
    misfire_grace: timedelta | float | None = None,
    coalesce: bool | None = None,
    max_concurrent: int | None = None,
    labels: Mapping[str, str] | None = None,
    misfire: Misfire | None = None,
    catchup_window: timedelta | float | None = None,
    catchup_limit: int | None = None,
    overlap: Overlap | None = None,
    retry: RetryPolicy | job_pb2.RetryPolicy | None = None,
    timeout: timedelta | float | None = None,
    history_limit: int | None = None,
) -> job_pb2.Job:
    return job_pb2.Job(
        id=job_id,
        etag=etag,
        task=task or "",
        trigger=trigger_message(trigger) if trigger is not None else None,
        args=struct(args) if args is not None else None,
        display_name=display_name or "",
        description=description or "",
        paused=paused,
        misfire_grace=duration(misfire_grace) if misfire_grace is not None else None,
        coalesce=coalesce,
        max_concurrent=max_concurrent or 0,
        labels=labels,
        misfire_policy=(
            misfire_policy(misfire) if misfire is not None else job_pb2.MISFIRE_POLICY_UNSPECIFIED
        ),
        # 0 means "no window" and "no timeout": sent as unset, which is how the server says so.
        catchup_window=duration(catchup_window) if catchup_window else None,
        catchup_limit=catchup_limit or 0,
        overlap_policy=overlap_value(overlap),
        retry=retry_message(retry) if retry is not None else None,
        timeout=duration(timeout) if timeout else None,
        history_limit=history_limit or 0,
    )


def with_celery(
    job: job_pb2.Job, celery: CeleryOptions | job_pb2.CeleryOptions | None
) -> job_pb2.Job:
    if celery is not None:
        job.executor = execution_pb2.EXECUTOR_CELERY
        job.celery.CopyFrom(celery_message(celery))
    return job


# create_job's argument names that _job names otherwise.
RENAMED = {"misfire_policy": "misfire", "overlap_policy": "overlap"}


def create_request(
    spec: Mapping[str, Any] | job_pb2.Job | pb.CreateJobRequest,
) -> pb.CreateJobRequest:
    """A CreateJob request from create_job's keyword arguments, or from a message."""
    if isinstance(spec, pb.CreateJobRequest):
        return spec
    if isinstance(spec, job_pb2.Job):
        return pb.CreateJobRequest(job=spec)
    fields = dict(spec)
    job_id, request_id = fields.pop("job_id", ""), fields.pop("request_id", "")
    celery = fields.pop("celery", None)
    job = job_message(job_id, **{RENAMED.get(name, name): value for name, value in fields.items()})
    return pb.CreateJobRequest(job=with_celery(job, celery), request_id=request_id)
