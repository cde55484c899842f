"""AsyncClient: the SDK's calls, each ProtoClient's with its reply converted to dataclasses."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from chronoplane.client import _from_proto as convert
from chronoplane.client._client import ProtoClient

__all__ = ["AsyncClient"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _same(value: T) -> T:
    return value


def _returning(
    method: Callable[Concatenate[ProtoClient, P], Awaitable[R]], conversion: Callable[[R], T]
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """ProtoClient's ``method`` (its arguments, its docstring), returning ``conversion`` of
    its reply."""

    @functools.wraps(method)
    async def call(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return conversion(await method(self._proto, *args, **kwargs))

    return call


def _streaming(
    method: Callable[Concatenate[ProtoClient, P], AsyncGenerator[R, None]],
    conversion: Callable[[R], T],
) -> Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]]:
    """ProtoClient's watch ``method``, yielding ``conversion`` of each event."""

    @functools.wraps(method)
    async def call(
        self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncGenerator[T, None]:
        stream = method(self._proto, *args, **kwargs)
        try:
            async for event in stream:
                yield conversion(event)
        finally:
            await stream.aclose()

    return call


class AsyncClient:
    """A connection to a Chronoplane server, to use as ``async with AsyncClient(address)``;
    :class:`Client` has the same methods for code without an event loop.

    ``timeout`` bounds each call, in seconds (None waits for ever). ``token`` is sent as
    ``authorization: Bearer <token>`` on every call. ``tls_ca`` (a PEM file; or
    ``tls=True`` for the system's roots) makes the channel TLS; ``tls_cert`` and ``tls_key``
    add a client certificate (mTLS). A failed call raises a subclass of
    :class:`chronoplane.client.errors.ChronoplaneError`.

    Calls return dataclasses (:mod:`chronoplane.client.models`): aware datetimes in UTC,
    timedeltas, JSON values. A job's settings, in :meth:`create_job` and :meth:`update_job`:
    durations are timedeltas or seconds; policies are :class:`MisfirePolicy` and
    :class:`OverlapPolicy` members or their names, like every enum the client takes.

    - ``misfire_policy``: what happens to fires missed by more than ``misfire_grace``
      (default 60 s): ``"skip"``, ``"run_once"`` (the default) or ``"run_all"``, at most
      ``catchup_limit`` (default 10) of them, none older than ``catchup_window``.
    - ``overlap_policy``: what a fire does when ``max_concurrent`` (default 1) runs are
      going: ``"skip"`` (the default), ``"allow"``, ``"buffer_one"``, ``"buffer_all"`` or
      ``"cancel_running"``.
    - ``retry``: from :func:`retry_policy`; ``timeout``: runs longer than this end
      TIMED_OUT; ``history_limit``: keep this many executions, the newest (0: no limit).
    - ``celery``: run the job's executions on Celery workers, routed so (``task`` is then a
      Celery task name registered with ``chronoplane.celery``; the server needs
      ``celery_broker_url``).
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
        self._proto = ProtoClient(
            address,
            timeout=timeout,
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )

    @property
    def address(self) -> str:
        return self._proto.address

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        await self._proto.close()

    # Each call takes what ProtoClient's does; the docstrings are ProtoClient's.
    create_job = _returning(ProtoClient.create_job, convert.job)
    batch_create_jobs = _returning(ProtoClient.batch_create_jobs, convert.each(convert.job))
    get_job = _returning(ProtoClient.get_job, convert.job)
    list_jobs = _returning(ProtoClient.list_jobs, convert.each(convert.job))
    update_job = _returning(ProtoClient.update_job, convert.job)
    delete_job = _returning(ProtoClient.delete_job, _same)
    pause_job = _returning(ProtoClient.pause_job, convert.job)
    resume_job = _returning(ProtoClient.resume_job, convert.job)
    trigger_job = _returning(ProtoClient.trigger_job, convert.execution)
    backfill_job = _returning(ProtoClient.backfill_job, convert.backfill_result)
    get_execution = _returning(ProtoClient.get_execution, convert.execution)
    list_executions = _returning(ProtoClient.list_executions, convert.each(convert.execution))
    cancel_execution = _returning(ProtoClient.cancel_execution, convert.execution)
    purge_executions = _returning(ProtoClient.purge_executions, _same)
    watch_executions = _streaming(ProtoClient.watch_executions, convert.execution_event)
    watch_jobs = _streaming(ProtoClient.watch_jobs, convert.job_event)
    list_instances = _returning(ProtoClient.list_instances, convert.each(convert.instance))
    list_audit_events = _returning(ProtoClient.list_audit_events, convert.each(convert.audit_event))
    list_tasks = _returning(ProtoClient.list_tasks, convert.each(convert.task))
    preview_trigger = _returning(ProtoClient.preview_trigger, _same)
