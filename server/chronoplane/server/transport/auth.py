"""Authentication and authorization of every call, before its handler runs.

The credentials are the ``authorization: Bearer <token>`` metadata or the verified client
certificate's common name (mTLS); ``security.Authenticator`` turns them into an identity and
the RPC table decides. Health is open to all; reflection follows the ``reflection`` setting.
Unary and streaming calls alike get UNAUTHENTICATED or PERMISSION_DENIED.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from chronoplane.server.errors import ChronoplaneError
from chronoplane.server.security import Authenticator, current_identity
from chronoplane.server.transport.errors import PerMethod, end_with, status_for

__all__ = ["AuthInterceptor"]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."
SCHEDULER_SERVICE = "chronoplane.v1.SchedulerService"


def _credentials(context: Any) -> tuple[str | None, str | None]:
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else value.decode()
    subject = None
    names = (context.auth_context() or {}).get("x509_common_name")
    if names:
        subject = names[0].decode()
    return authorization, subject


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authenticator: Authenticator, *, reflection: str) -> None:
        self._authenticator = authenticator
        self._reflection = reflection
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
        return self._wrapped.get(method, handler, lambda: self._guarded(method, handler))

    def _guarded(self, method: str, handler: Any) -> Any:
        service, _, rpc = method.lstrip("/").partition("/")
        if service == HEALTH_SERVICE:
            return handler
        if service.startswith(REFLECTION_PREFIX):
            if self._reflection == "on":
                return handler
            return _wrapped(handler, self._check(None))
        return _wrapped(handler, self._check(rpc if service == SCHEDULER_SERVICE else ""))

    def _check(self, rpc: str | None) -> Callable[[Any], Awaitable[None]]:
        """Raises unless the caller may make the call (``rpc`` None: any identity will do)."""

        async def check(context: Any) -> None:
            identity = await self._authenticator.identify(*_credentials(context))
            current_identity.set(identity)  # known to the audit log, even if refused
            if rpc is not None:
                self._authenticator.authorize(identity, rpc)

        return check


async def _refused(check: Callable[[Any], Awaitable[None]], context: Any) -> bool:
    """Runs the check; a refusal ends the call (without an exception that would keep the
    request alive: see errors.end_with)."""
    try:
        await check(context)
    except ChronoplaneError as error:
        status = status_for(error)
    else:
        return False
    end_with(context, status)
    return True


def _wrapped(handler: Any, check: Callable[[Any], Awaitable[None]]) -> Any:
    def guard(behaviour: Any) -> Any:
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                if await _refused(check, context):
                    return
                async for item in behaviour(request, context):
                    yield item

            return streaming

        async def call(request: Any, context: Any) -> Any:
            if await _refused(check, context):
                return None
            return await behaviour(request, context)

        return call

    return grpc.experimental.wrap_server_method_handler(guard, handler)
