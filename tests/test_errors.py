"""The error edge: unexpected exceptions become INTERNAL with an id, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from harness import error_reason

from chronoplane.server.errors import JobNotFound
from chronoplane.server.transport.errors import ErrorInterceptor


async def _boom(request: bytes, context: Any) -> bytes:
    raise RuntimeError("secret detail: password=hunter2")


async def _missing(request: bytes, context: Any) -> bytes:
    raise JobNotFound("nightly")


@pytest_asyncio.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("chronoplane.test.Errors", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


async def test_unexpected_errors_are_masked_and_logged_with_an_id(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    call = channel.unary_unary("/chronoplane.test.Errors/Boom")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    details = error.details() or ""
    assert "hunter2" not in details and "Traceback" not in details
    error_id = details.split()[2].rstrip(";")
    assert error_reason(error) == "INTERNAL"
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_domain_errors_map_through_the_table(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/chronoplane.test.Errors/Missing")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "job 'nightly' not found"
    assert error_reason(caught.value) == "JOB_NOT_FOUND"
