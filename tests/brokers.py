"""Finds Celery brokers for the tests, or starts one, and runs real Celery workers.

Redis: ``CHRONOPLANE_TEST_REDIS_URL``; the local server on 127.0.0.1:6379; else a
``redis-server`` from PATH on a free port. RabbitMQ: ``CHRONOPLANE_TEST_AMQP_URL``, else the
local one on 127.0.0.1:5672 (guest/guest). If none works the tests fail, saying how to
provide one: they never skip. A test that stops its broker always starts a ``redis-server``
of its own (the shared one is not its to stop).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import BIN, ROOT, free_port

__all__ = [
    "RedisServer",
    "Worker",
    "amqp_url",
    "ledger_lines",
    "redis_url",
    "start_redis",
    "start_worker",
]

HOW_TO_REDIS = (
    "the Celery tests need Redis: set CHRONOPLANE_TEST_REDIS_URL=redis://host:port, run a "
    "server on 127.0.0.1:6379, or put redis-server on PATH (apt-get install redis-server)"
)
HOW_TO_AMQP = (
    "the Celery tests need RabbitMQ: set CHRONOPLANE_TEST_AMQP_URL=amqp://user:pass@host:port// "
    "or run a server on 127.0.0.1:5672 with the guest account (apt-get install rabbitmq-server)"
)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("this test starts its own Redis: " + HOW_TO_REDIS)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def start_redis(directory: Path) -> RedisServer:
    server = RedisServer(port=free_port(), directory=directory)
    server.start()
    return server


_own_redis: RedisServer | None = None


def redis_url(directory: Path) -> str:
    global _own_redis
    configured = os.environ.get("CHRONOPLANE_TEST_REDIS_URL")
    if configured:
        return configured
    if _reachable("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0"
    if _own_redis is None:
        _own_redis = start_redis(directory)
    return _own_redis.url


def amqp_url() -> str:
    configured = os.environ.get("CHRONOPLANE_TEST_AMQP_URL")
    if configured:
        return configured
    if _reachable("127.0.0.1", 5672):
        return "amqp://guest:guest@127.0.0.1:5672//"
    raise AssertionError(HOW_TO_AMQP)


@dataclass
class Worker:
    """A ``celery worker`` process (in its own process group: kill -9 takes all of it)."""

    process: subprocess.Popen[bytes]
    log_path: Path
    name: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "ready." not in self.log:
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not start in {timeout} s:\n{self.log}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9 of the worker and its pool processes."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(
    workdir: Path,
    *,
    broker: str,
    database_url: str,
    queue: str,
    pool: str = "prefork",
    concurrency: int = 2,
    name: str = "w1",
    env: dict[str, str] | None = None,
) -> Worker:
    log_path = workdir / f"worker-{name}-{time.monotonic_ns()}.log"
    environment = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "tests"),
        CELERY_BROKER_URL=broker,
        CHRONOPLANE_DATABASE_URL=database_url,
        **(env or {}),
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "celery_tasks",
                "worker",
                f"--pool={pool}",
                f"--concurrency={concurrency}",
                f"--queues={queue}",
                f"--hostname={name}@%h",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=workdir,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(process, log_path, name)
    worker.wait_ready()
    return worker


def ledger_lines(path: Path) -> list[str]:
    """The lines the ``celery.ledger`` task wrote."""
    return path.read_text().splitlines() if path.exists() else []
