"""Helpers shared by the tests: running coroutines off the test loop, servers, grpc."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chronoplane.v1 import scheduler_service_pb2_grpc

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion on its own loop in another thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, str]:
    """The BadRequest field violations of a failed call, by field."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if isinstance(detail, any_pb2.Any) and detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


def error_reason(error: grpc.RpcError) -> str:
    return str(error_info(error).reason)


@dataclass
class ServerProcess:
    """A ``chronoplane serve`` subprocess."""

    process: subprocess.Popen[str]
    address: str
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stub(self) -> scheduler_service_pb2_grpc.SchedulerServiceStub:
        return scheduler_service_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(self.address))

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server did not stop within {timeout} s of SIGTERM:\n{self.log[-20000:]}"
            ) from None


def start_server(
    database_url: str,
    workdir: Path,
    *extra: str,
    port: int | None = None,
    wait: bool = True,
    tasks: tuple[str, ...] = ("testtasks",),
) -> ServerProcess:
    port = port or free_port()
    log_path = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "chronoplane"),
                "serve",
                "--address",
                f"127.0.0.1:{port}",
                "--database-url",
                database_url,
                *(f"--tasks={module}" for module in tasks),
                *extra,
            ],
            cwd=workdir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = ServerProcess(process, f"127.0.0.1:{port}", log_path)
    if wait:
        wait_serving(server)
    return server


def wait_serving(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log}")
        if re.search(r"serving on ", server.log):
            return
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server did not start in {timeout} s:\n{server.log}")


@contextlib.contextmanager
def running_server(database_url: str, workdir: Path, *extra: str) -> Iterator[ServerProcess]:
    server = start_server(database_url, workdir, *extra)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
