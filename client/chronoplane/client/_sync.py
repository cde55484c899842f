"""Client: AsyncClient's calls for code without an event loop.

Its AsyncClient lives on an event loop in a thread of its own; each call runs there and the
caller waits for the answer, so a Client works from any thread, even one whose own event loop
is running (a notebook's).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from chronoplane.client._async import AsyncClient

__all__ = ["Client"]

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """AsyncClient's ``method``, waited for."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    return call


def _iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    """AsyncClient's watch ``method`` as an iterator; closing it (or leaving a ``for`` loop
    over it and dropping it) ends the stream."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._client, *args, **kwargs))

    return call


async def _next(stream: AsyncGenerator[T, None]) -> T:
    return await anext(stream)


async def _connect(address: str, options: dict[str, Any]) -> AsyncClient:
    # grpc.aio binds a channel to the loop it is made on: make it on the client's.
    return AsyncClient(address, **options)


class Client:
    """A connection to a Chronoplane server, to use as ``with Client(address) as client``.

    It takes the arguments :class:`AsyncClient` takes, and has its methods, each returning
    the result instead of a coroutine; the watches return iterators.
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"chronoplane-client {address}", daemon=True
        )
        self._thread.start()
        options = {
            "timeout": timeout,
            "token": token,
            "tls": tls,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
        }
        self._client = self._run(_connect(address, options))

    @property
    def address(self) -> str:
        return self._client.address

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the client's thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C while waiting: the call stops too
            raise

    def _iterate(self, stream: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(stream.aclose())

    create_job = _blocking(AsyncClient.create_job)
    batch_create_jobs = _blocking(AsyncClient.batch_create_jobs)
    get_job = _blocking(AsyncClient.get_job)
    list_jobs = _blocking(AsyncClient.list_jobs)
    update_job = _blocking(AsyncClient.update_job)
    delete_job = _blocking(AsyncClient.delete_job)
    pause_job = _blocking(AsyncClient.pause_job)
    resume_job = _blocking(AsyncClient.resume_job)
    trigger_job = _blocking(AsyncClient.trigger_job)
    backfill_job = _blocking(AsyncClient.backfill_job)
    get_execution = _blocking(AsyncClient.get_execution)
    list_executions = _blocking(AsyncClient.list_executions)
    cancel_execution = _blocking(AsyncClient.cancel_execution)
    purge_executions = _blocking(AsyncClient.purge_executions)
    watch_executions = _iterating(AsyncClient.watch_executions)
    watch_jobs = _iterating(AsyncClient.watch_jobs)
    list_instances = _blocking(AsyncClient.list_instances)
    list_audit_events = _blocking(AsyncClient.list_audit_events)
    list_tasks = _blocking(AsyncClient.list_tasks)
    preview_trigger = _blocking(AsyncClient.preview_trigger)
