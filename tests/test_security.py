"""TLS, mTLS, tokens and roles against the real server. Certificates are made here, per test
session, with ``cryptography``: a CA, a server certificate for 127.0.0.1, client
certificates from that CA and from another."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import InProcessServer, serving
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format, struct_pb2
from harness import BIN, free_port, start_server, violations

from chronoplane.client import AsyncClient, ChronoplaneError, WatchEventKind, cron
from chronoplane.server.config import Settings
from chronoplane.server.models import Role, StoredToken
from chronoplane.server.security import RPC_ROLES, hash_secret, new_token
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=ops-bot, from the CA
    client_key: Path
    stranger_cert: Path  # CN=ops-bot, from another CA
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False, server: bool = False
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("chronoplane test CA", None, ca=True)
    other_cert, other_key = _issue("another CA", None, ca=True)
    server_cert, server_key = _issue("localhost", (ca_cert.subject, ca_key), server=True)
    client_cert, client_key = _issue("ops-bot", (ca_cert.subject, ca_key))
    stranger_cert, stranger_key = _issue("ops-bot", (other_cert.subject, other_key))
    ca, _ = _write(directory, "ca", ca_cert, ca_key)
    server = _write(directory, "server", server_cert, server_key)
    client = _write(directory, "client", client_cert, client_key)
    stranger = _write(directory, "stranger", stranger_cert, stranger_key)
    return Pki(ca, *server, *client, *stranger)


# -- tokens -------------------------------------------------------------------------------------


async def make_token(url: str, name: str, role: Role, *, expires: datetime | None = None) -> str:
    token_id, secret, token = new_token()
    store = SqlAlchemyStore.from_url(url)
    try:
        await store.create_token(
            StoredToken(
                id=token_id,
                name=name,
                role=role,
                secret_hash=hash_secret(secret),
                create_time=datetime.now(UTC),
                expire_time=expires,
                revoke_time=None,
            )
        )
    finally:
        await store.close()
    return token


def guarded_server(database_url: str) -> contextlib.AbstractAsyncContextManager[InProcessServer]:
    """A loopback server that requires credentials."""
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        require_auth=True,
    )
    return serving(settings)


@pytest_asyncio.fixture
async def guarded(database_url: str) -> Any:
    async with guarded_server(database_url) as server:
        yield server


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def code_of(server: InProcessServer, method: str, token: str | None) -> grpc.StatusCode:
    """The status of calling ``method`` with an empty request (OK if it answered)."""
    descriptor = SERVICE.methods_by_name[method]
    request_type = pb.__dict__[descriptor.input_type.name]
    response_type = pb.__dict__[descriptor.output_type.name]
    path = f"/{SERVICE.full_name}/{method}"
    metadata = bearer(token) if token else None
    if descriptor.server_streaming:
        call = server.channel.unary_stream(
            path,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(request_type(), metadata=metadata, timeout=1.0)
    else:
        call = server.channel.unary_unary(
            path,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(request_type(), metadata=metadata, timeout=5.0)
    try:
        if descriptor.server_streaming:
            await call.read()
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- roles --------------------------------------------------------------------------------------


def test_every_rpc_of_the_service_is_in_the_role_table() -> None:
    assert set(RPC_ROLES) == {m.name for m in SERVICE.methods}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_each_role_may_call_exactly_its_rpcs(guarded: InProcessServer) -> None:
    url = guarded.database_url
    tokens = {role: await make_token(url, role.name.lower(), role) for role in Role}
    denied = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    for method in SERVICE.methods:
        assert await code_of(guarded, method.name, None) == grpc.StatusCode.UNAUTHENTICATED
        for role, token in tokens.items():
            code = await code_of(guarded, method.name, token)
            if role >= RPC_ROLES[method.name]:
                assert code not in denied, (method.name, role, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, role, code)


async def test_bad_expired_and_revoked_tokens_are_unauthenticated(
    guarded: InProcessServer,
) -> None:
    url = guarded.database_url
    ok = await make_token(url, "ci", Role.VIEWER)
    old = await make_token(url, "old", Role.ADMIN, expires=datetime.now(UTC) - timedelta(seconds=1))
    assert await code_of(guarded, "ListJobs", ok) == grpc.StatusCode.OK
    assert await code_of(guarded, "ListJobs", old) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(guarded, "ListJobs", ok[:-2] + "xx") == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(guarded, "ListJobs", "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
    store = SqlAlchemyStore.from_url(url)
    try:
        revoked = await store.revoke_token("ci", now=datetime.now(UTC))
    finally:
        await store.close()
    assert revoked is not None and revoked.revoke_time is not None
    # Within the authenticator's 5 s memory of looked-up tokens.
    for _ in range(70):
        if await code_of(guarded, "ListJobs", ok) == grpc.StatusCode.UNAUTHENTICATED:
            break
        await asyncio.sleep(0.1)
    assert await code_of(guarded, "ListJobs", ok) == grpc.StatusCode.UNAUTHENTICATED


async def test_streams_are_refused_like_unary_calls(guarded: InProcessServer) -> None:
    viewer = await make_token(guarded.database_url, "dash", Role.VIEWER)
    watch = guarded.stub.WatchJobs(pb.WatchJobsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(guarded.app.address or "", token=viewer) as client:
        stream = client.watch_jobs(snapshot=True, resume=False)
        marker = await anext(stream)
        assert marker.kind is WatchEventKind.SNAPSHOT_END
        await stream.aclose()


# -- TLS and client certificates ----------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_mtls_admits_only_certificates_from_the_ca_and_maps_them_to_a_role(
    database_url: str, pki: Pki
) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        shutdown_grace=1.0,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        client_roles=["ops-bot=operator"],
    )
    async with serving(settings) as server:
        address = server.app.address or ""

        async def list_jobs(**credentials: Any) -> grpc.StatusCode:
            async with AsyncClient(address, timeout=5, **credentials) as client:
                try:
                    await client.list_jobs()
                except ChronoplaneError as error:
                    return error.code
                return grpc.StatusCode.OK

        assert await list_jobs(tls_ca=str(pki.ca)) == grpc.StatusCode.UNAVAILABLE
        stranger = {"tls_cert": str(pki.stranger_cert), "tls_key": str(pki.stranger_key)}
        assert await list_jobs(tls_ca=str(pki.ca), **stranger) == grpc.StatusCode.UNAVAILABLE
        client = {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
        assert await list_jobs(tls_ca=str(pki.ca), **client) == grpc.StatusCode.OK
        async with AsyncClient(
            address,
            timeout=5,
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        ) as mtls:
            with pytest.raises(Exception) as caught:
                await mtls.create_job("nope", task="chronoplane.echo", trigger=cron("0 3 * * *"))
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert "operator" in str(caught.value)
        # Plain text to a TLS port gets nowhere.
        async with AsyncClient(address, timeout=3) as plain:
            with pytest.raises(Exception) as caught:
                await plain.list_jobs()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_grpcurl_over_tls_with_a_token_and_the_token_cli(
    postgres_url: str, pki: Pki, tmp_path: Path
) -> None:
    chronoplane = str(BIN / "chronoplane")
    created = subprocess.run(
        [
            chronoplane,
            "token",
            "create",
            "--name",
            "deploy",
            "--role",
            "operator",
            "--expires-in",
            "30",
            "--database-url",
            postgres_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = created.stdout.strip()
    assert token.startswith("cpt_")
    listed = subprocess.run(
        [chronoplane, "token", "list", "--database-url", postgres_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "deploy" in listed and "operator" in listed and "active" in listed
    # The secret is never shown again (split twice: a secret may hold "_" itself).
    assert token.split("_", 2)[2] not in listed
    port = free_port()
    # Beyond loopback (the later --address wins over the harness's 127.0.0.1).
    server = start_server(
        postgres_url,
        tmp_path,
        f"--address=0.0.0.0:{port}",
        f"--tls-cert={pki.server_cert}",
        f"--tls-key={pki.server_key}",
        port=port,
    )
    try:
        serving_line = next(line for line in server.log.splitlines() if "serving on" in line)
        assert "with TLS" in serving_line and "credentials required" in serving_line
        grpcurl = [str(BIN / "grpcurl"), "-cacert", str(pki.ca), "-servername", "localhost"]
        target = f"127.0.0.1:{port}"
        anonymous = subprocess.run(
            [*grpcurl, target, "list"], capture_output=True, text=True, timeout=30
        )
        assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
        header = ["-H", f"authorization: Bearer {token}"]
        services = subprocess.run(
            [*grpcurl, *header, target, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "chronoplane.v1.SchedulerService" in services
        jobs = subprocess.run(
            [*grpcurl, *header, target, "chronoplane.v1.SchedulerService/ListJobs"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert jobs.returncode == 0
        # Health is open: the token goes only to reflection (for the schema), not the call.
        health = subprocess.run(
            [
                *grpcurl,
                "-reflect-header",
                f"authorization: Bearer {token}",
                target,
                "grpc.health.v1.Health/Check",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "SERVING" in health
        revoked = subprocess.run(
            [chronoplane, "token", "revoke", "deploy", "--database-url", postgres_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert revoked.returncode == 0, revoked.stderr
    finally:
        server.stop()


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_message_size_and_concurrent_calls_are_limited(database_url: str) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        shutdown_grace=1.0,
        max_message_bytes=8192,
        max_concurrent_rpcs=3,
    )
    async with serving(settings) as server:
        big = pb.CreateJobRequest(job=jpb.Job(id="big", description="x" * 10_000))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.CreateJob(big)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "8192" in (caught.value.details() or "")
        # Three streams held open take every slot; the fourth call is refused, not queued.
        streams = [server.stub.WatchJobs(pb.WatchJobsRequest()) for _ in range(3)]
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.ListJobs(pb.ListJobsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.cancel()
        await asyncio.sleep(0.5)
        listed = await server.stub.ListJobs(pb.ListJobsRequest(), timeout=5)
        assert list(listed.jobs) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_field_limits_are_settings_and_violations_name_them(database_url: str) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        max_args_bytes=64,
        max_args_depth=2,
        max_display_name=8,
        max_description=16,
        max_labels=2,
        max_label_value=4,
        max_page_size=3,
    )

    def job(job_id: str, **fields: Any) -> jpb.Job:
        return jpb.Job(
            id=job_id,
            task="test.add",
            trigger=jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *")),
            **fields,
        )

    def args(value: dict[str, Any]) -> struct_pb2.Struct:
        return json_format.ParseDict(value, struct_pb2.Struct())

    async with serving(settings) as server:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.CreateJob(
                pb.CreateJobRequest(
                    job=job(
                        "too-much",
                        display_name="a long name",
                        description="x" * 17,
                        labels={"a": "1", "b": "2", "c": "3"},
                        args=args({"blob": "y" * 100}),
                    )
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        found = violations(caught.value)
        assert "max_display_name" in found["job.display_name"]
        assert "max_description" in found["job.description"]
        assert "max_labels" in found["job.labels"]
        assert "max_args_bytes" in found["job.args"]
        for bad_args, setting in [({"a": {"b": {"c": 1}}}, "max_args_depth")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.stub.CreateJob(
                    pb.CreateJobRequest(job=job("deep", args=args(bad_args)))
                )
            assert setting in violations(caught.value)["job.args"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.CreateJob(pb.CreateJobRequest(job=job("lv", labels={"k": "12345"})))
        assert "max_label_value" in violations(caught.value)["job.labels"]
        # Within the limits all is well; pages hold at most max_page_size.
        for n in range(5):
            await server.stub.CreateJob(
                pb.CreateJobRequest(job=job(f"ok{n}", display_name="short", labels={"k": "v"}))
            )
        page = await server.stub.ListJobs(pb.ListJobsRequest(page_size=100))
        assert len(page.jobs) == 3 and page.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.TriggerJob(
                pb.TriggerJobRequest(id="ok0", args=args({"blob": "y" * 100}))
            )
        assert "max_args_bytes" in violations(caught.value)["args"]


def test_a_limit_out_of_range_stops_the_server_from_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "chronoplane"),
            "serve",
            "--max-display-name=1000",
            f"--database-url=sqlite+aiosqlite:///{tmp_path}/x.db",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_display_name must be between 1 and 256" in result.stderr
