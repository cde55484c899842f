"""Hostile input changes nothing: hypothesis builds requests of every RPC of the service from
its descriptor (valid-looking and malformed: odd strings, huge numbers, unknown enum values,
out-of-range timestamps, deep structs), sends them to the real server, and checks that the
answer is never INTERNAL or UNKNOWN, that the server stays healthy, and that the database's
invariants hold afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import descriptor as gd
from google.protobuf import message as gm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import running_server, violations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronoplane.v1 import scheduler_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
F = gd.FieldDescriptor

# Strings that have broken parsers before: NUL, control characters, right-to-left marks,
# very long, things that look like SQL, cron and time zones.
NASTY = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "'; DROP TABLE jobs; --",
        "%",
        "_",
        "*/0 * * * *",
        "0 0 31 2 *",
        "Europe/Berlín",
        "../../etc/passwd",
        "\u202e",
        "x" * 5000,
        "chronoplane.echo",
        "tick",
        "*",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=40))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 10**12]))
INT32 = st.integers(-(2**31), 2**31 - 1)


def message_strategy(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """A dict of field values for ``descriptor`` (an empty one past a small depth)."""
    if depth > 4:
        return st.just({})
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        value = _field_strategy(field, depth)
        if field.is_repeated and not _is_map(field):
            value = st.lists(value, max_size=3)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _is_map(field: Any) -> bool:
    return bool(field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


def _field_strategy(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        return st.dictionaries(TEXT, _field_strategy(value_field, depth + 1), max_size=3)
    kind = field.type
    if kind == F.TYPE_STRING:
        return TEXT
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return INT64
    if kind in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return INT32
    if kind in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 50))
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=20)
    return message_strategy(field.message_type, depth + 1)


def build(message: gm.Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field: Any = message.DESCRIPTOR.fields_by_name[name]
        if _is_map(field):
            target = getattr(message, name)
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.type == F.TYPE_MESSAGE:
                    build(target[key], item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target = getattr(message, name)
            for item in value:
                if field.type == F.TYPE_MESSAGE:
                    build(target.add(), item)
                else:
                    target.append(item)
        elif field.type == F.TYPE_MESSAGE:
            build(getattr(message, name), value)
        else:
            setattr(message, name, value)


def call(channel: grpc.Channel, method: gd.MethodDescriptor, request: Any) -> grpc.StatusCode:
    request_type = type(request)
    response_type = pb.__dict__[method.output_type.name]
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, timeout=0.5)
            next(iter(stream), None)
        else:
            channel.unary_unary(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, timeout=10)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def requests() -> st.SearchStrategy[tuple[gd.MethodDescriptor, gm.Message]]:
    def one(method: gd.MethodDescriptor) -> st.SearchStrategy[tuple[Any, Any]]:
        request_type = pb.__dict__[method.input_type.name]

        def make(values: dict[str, Any]) -> tuple[Any, Any]:
            request = request_type()
            try:
                build(request, values)
            except (ValueError, TypeError):
                request = request_type()  # a value protobuf itself refuses to hold
            return method, request

        return message_strategy(method.input_type).map(make)

    return st.one_of([one(m) for m in SERVICE.methods])


async def invariants(url: str) -> None:
    """What must hold in the database whatever was sent."""
    if not url.startswith("postgresql"):
        return
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        orphans = await conn.fetchval(
            "SELECT count(*) FROM executions e LEFT JOIN jobs j ON j.id = e.job_id "
            "WHERE j.id IS NULL"
        )
        assert orphans == 0, "executions without their job"
        last, count, top = await conn.fetchrow(
            "SELECT (SELECT last_cursor FROM event_log), count(*), coalesce(max(cursor), 0) "
            "FROM events"
        )
        assert count == top == last, "the event history has a gap"
        bad = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE version < 1 OR max_concurrent < 0 "
            "OR length(id) > 128 OR id = ''"
        )
        assert bad == 0
    finally:
        await conn.close()


def test_no_request_makes_the_server_fail_or_corrupt_the_database(
    postgres_url: str, tmp_path: Path
) -> None:
    seen: dict[str, set[grpc.StatusCode]] = {}
    with running_server(postgres_url, tmp_path) as server:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)

        @settings(
            max_examples=1500,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(requests())
        def check(method_request: tuple[gd.MethodDescriptor, gm.Message]) -> None:
            method, request = method_request
            code = call(channel, method, request)
            seen.setdefault(method.name, set()).add(code)
            assert code not in FORBIDDEN, (method.name, code, request)

        try:
            check()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        finally:
            channel.close()
        assert server.process.poll() is None, "the server died"
        assert "internal error" not in server.log
    asyncio.run(invariants(postgres_url))
    # Every RPC was tried, and most were refused for what they carried.
    assert set(seen) == {m.name for m in SERVICE.methods}, set(seen)


async def test_nul_characters_are_refused_naming_the_field(server: InProcessServer) -> None:

    cases = [
        (server.stub.GetJob(pb.GetJobRequest(id="a\x00b")), "id"),
        (
            server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="x", page_token="\x00")),
            "page_token",
        ),
        (
            server.stub.WatchJobs(pb.WatchJobsRequest(labels={"team": "\x00"})).read(),
            "labels['team']",
        ),
    ]
    for call_, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(caught.value), (field, violations(caught.value))


# -- bytes that are no request at all --------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]
CORRUPT = b"\x0a\xff"  # a length-delimited field 1 whose length runs past the end
BAD_UTF8 = b"\x0a\x03\xff\xfe\xfd"  # field 1, three bytes that are not UTF-8


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_requests_grpc_cannot_parse_are_invalid_argument_for_every_rpc(
    server: InProcessServer,
) -> None:
    for method in SERVICE.methods:
        field_1 = method.input_type.fields_by_number.get(1)
        payloads = [CORRUPT]
        if field_1 is not None and field_1.type == field_1.TYPE_STRING:
            payloads.append(BAD_UTF8)
        path = f"/{SERVICE.full_name}/{method.name}"
        for payload in payloads:
            if method.server_streaming:
                stream = server.channel.unary_stream(path, request_serializer=bytes)(payload)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stream.read()
            else:
                call = server.channel.unary_unary(path, request_serializer=bytes)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(payload)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, payload)
            assert "request" in violations(caught.value), method.name
    health = health_pb2_grpc.HealthStub(server.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # The health service too: bytes that are no HealthCheckRequest (a service name that is
    # not UTF-8) are refused as such, not answered UNKNOWN with a traceback in the log.
    check = server.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes)
    watch = server.channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=bytes)
    for payload in (CORRUPT, BAD_UTF8):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(payload)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request" in violations(caught.value)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(payload).read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
