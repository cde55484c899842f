"""The gRPC metrics (metrics.py): calls by method and status code, how long they took, open
streams and the messages sent on them.

Outermost of the interceptors, so that it counts every call of a method the server serves,
refusals by decoding and authentication included (calls of unknown methods are not counted:
their names would be unbounded label values). GetJob is measured against a trivial echo
server, so a unary call costs two clock reads, one histogram observation and one counter
increment, on label children made once per method (and status code) and reused.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc

from chronoplane.server.metrics import (
    GRPC_HANDLED,
    GRPC_HANDLING_SECONDS,
    GRPC_MSG_SENT,
    GRPC_STREAMS_OPEN,
)
from chronoplane.server.transport.errors import PerMethod

__all__ = ["MetricsInterceptor"]

_NAMES: dict[Any, str] = {code: code.name for code in grpc.StatusCode}


def _code(context: Any, default: str) -> str:
    """The name of the status code set on the call's context, or ``default``."""
    return _NAMES.get(context.code(), default)


class _Method:
    """One method's label children."""

    __slots__ = ("_codes", "name", "open", "seconds", "sent")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seconds = GRPC_HANDLING_SECONDS.labels(name)
        self._codes: dict[str, Any] = {}
        self.open = GRPC_STREAMS_OPEN.labels(name)
        self.sent = GRPC_MSG_SENT.labels(name)

    def ended(self, code: str, started: float) -> None:
        self.seconds.observe(perf_counter() - started)
        handled = self._codes.get(code)
        if handled is None:
            handled = self._codes[code] = GRPC_HANDLED.labels(self.name, code)
        handled.inc()


class _Counting:
    """A stream's context whose writes are counted; everything else is the context's."""

    def __init__(self, context: Any, sent: Any) -> None:
        self._context = context
        self._sent = sent

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
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
        return self._wrapped.get(method, handler, lambda: _measured(method, handler))


def _measured(method: str, handler: Any) -> Any:
    metrics = _Method(method)
    if not handler.response_streaming:
        return grpc.experimental.wrap_server_method_handler(
            lambda behaviour: _unary(metrics, behaviour), handler
        )
    return grpc.experimental.wrap_server_method_handler(
        lambda behaviour: _stream(metrics, behaviour), handler
    )


def _unary(metrics: _Method, behaviour: Any) -> Any:
    async def call(request: Any, context: Any) -> Any:
        started = perf_counter()
        code = "UNKNOWN"  # what grpc answers for an exception nobody handled
        try:
            response = await behaviour(request, context)
            code = _code(context, "OK")
            return response
        except grpc.aio.AbortError:
            code = _code(context, "UNKNOWN")
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            metrics.ended(code, started)

    return call


def _stream(metrics: _Method, behaviour: Any) -> Any:
    """A server stream, written with ``context.write`` or yielded by a generator."""
    if inspect.isasyncgenfunction(behaviour):

        async def generated(request: Any, context: Any) -> AsyncIterator[Any]:
            started = perf_counter()
            metrics.open.inc()
            code = "UNKNOWN"
            try:
                async for message in behaviour(request, context):
                    yield message
                    metrics.sent.inc()
                code = _code(context, "OK")
            except grpc.aio.AbortError:
                code = _code(context, "UNKNOWN")
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                metrics.open.dec()
                metrics.ended(code, started)

        return generated

    measured = _unary(metrics, behaviour)

    async def written(request: Any, context: Any) -> None:
        metrics.open.inc()
        try:
            await measured(request, _Counting(context, metrics.sent))
        finally:
            metrics.open.dec()

    return written
