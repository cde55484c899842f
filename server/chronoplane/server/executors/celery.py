"""The server's side of Celery: sends executions to the broker and revokes them.

The only server module that imports Celery (an optional extra: ``chronoplane[celery]``).
Celery's client is synchronous: each send runs in a small thread pool of its own, bounded in
time, so that a broker that hangs takes threads, never the event loop. The task id is the
execution id: a worker's wrapper (``chronoplane.celery``) knows its execution from it, and a
message sent twice names the same execution.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chronoplane.server.executors.abc import BrokerError
from chronoplane.server.storage.abc import Dispatch

__all__ = ["CeleryBroker"]

log = logging.getLogger(__name__)

# Headroom between a job's timeout (the soft limit, which the worker reports as TIMED_OUT)
# and the hard limit, at which Celery kills the task's process.
HARD_LIMIT_GRACE = 30.0


class CeleryBroker:
    def __init__(self, broker_url: str, *, send_timeout: float = 5.0, threads: int = 8) -> None:
        try:
            from celery import Celery
        except ImportError as error:  # pragma: no cover - depends on the installation
            raise ImportError(
                "celery_broker_url is set but Celery is not installed: "
                "pip install 'chronoplane[celery]'"
            ) from error
        self._app = Celery("chronoplane", broker=broker_url, set_as_current=False)
        seconds = max(1.0, send_timeout / 2)
        self._app.conf.update(
            # Fail fast: a send that cannot reach the broker raises, and the dispatcher
            # tries again later (the execution stays PENDING, with the reason).
            broker_connection_timeout=seconds,
            broker_connection_retry=False,
            broker_connection_retry_on_startup=False,
            broker_transport_options={
                "socket_timeout": seconds,
                "socket_connect_timeout": seconds,
                "max_retries": 0,
            },
            task_ignore_result=True,
        )
        self._send_timeout = send_timeout
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="chronoplane-celery")

    async def send(self, dispatch: Dispatch) -> None:
        execution = dispatch.execution
        options: dict[str, Any] = {
            "kwargs": execution.args,
            "task_id": execution.id,
            "retry": False,
            "headers": {"chronoplane_execution_id": execution.id},
        }
        if execution.trace_parent:
            # W3C trace context, as OpenTelemetry's Celery instrumentation reads it.
            options["headers"]["traceparent"] = execution.trace_parent
        if dispatch.options.queue:
            options["queue"] = dispatch.options.queue
        if dispatch.options.routing_key:
            options["routing_key"] = dispatch.options.routing_key
        if dispatch.options.priority is not None:
            options["priority"] = dispatch.options.priority
        if dispatch.timeout is not None:
            seconds = dispatch.timeout.total_seconds()
            options["soft_time_limit"] = seconds
            options["time_limit"] = seconds + HARD_LIMIT_GRACE
        send = functools.partial(self._app.send_task, execution.task, **options)
        await self._in_thread(send, f"sending {execution.id}")

    async def revoke(self, task_id: str) -> None:
        """Tells every worker to skip the task, or to stop it if it runs (SIGTERM to a
        prefork child; a gevent worker kills the greenlet)."""
        revoke = functools.partial(
            self._app.control.revoke, task_id, terminate=True, signal="SIGTERM"
        )
        await self._in_thread(revoke, f"revoking {task_id}")

    async def _in_thread(self, call: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, call)
        try:
            await asyncio.wait_for(asyncio.shield(future), self._send_timeout)
        except TimeoutError:
            timeout = self._send_timeout
            raise BrokerError(f"the broker did not answer within {timeout:g} s") from None
        except BrokerError:
            raise
        except Exception as error:
            raise BrokerError(f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._app.close()
