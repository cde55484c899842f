"""Finds a PostgreSQL server for the tests, or starts a throwaway one.

In order: ``CHRONOPLANE_TEST_POSTGRES_URL``; the local server on 127.0.0.1:5432; a cluster made
with ``initdb`` and started with ``pg_ctl`` (from PATH or Debian's /usr/lib/postgresql) in a
temporary directory. If none works the tests fail, saying how to provide one: they never skip.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

__all__ = ["PostgresServer", "find_postgres"]

HOW_TO = (
    "the tests need PostgreSQL: set CHRONOPLANE_TEST_POSTGRES_URL=postgresql://user@host:port/db "
    "(a role that may CREATE DATABASE), run a server on 127.0.0.1:5432 with trust auth, or put "
    "initdb and pg_ctl on PATH (apt-get install postgresql)"
)


@dataclass
class PostgresServer:
    """``dsn`` reaches a maintenance database; ``url_for(db)`` is the SQLAlchemy url."""

    host: str
    port: int
    user: str
    password: str | None
    maintenance_db: str
    data_dir: Path | None = None
    options: str = ""

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.maintenance_db)

    def dsn_for(self, database: str) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def url_for(self, database: str) -> str:
        return self.dsn_for(database).replace("postgresql://", "postgresql+asyncpg://", 1)

    def restart_immediately(self) -> None:
        """``pg_ctl restart -m immediate``: every session ends as in a crash (throwaway only)."""
        assert self.data_dir is not None, "only a throwaway cluster may be restarted"
        log = str(self.data_dir.parent / "log")
        command = [_tool("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-l", log]
        subprocess.run(
            _as_postgres([*command, "-w", "restart"]),
            check=True,
            capture_output=True,
        )

    def halt(self) -> None:
        """``pg_ctl stop -m fast``: sessions end, new connections are refused until
        ``resume`` (throwaway only)."""
        assert self.data_dir is not None, "only a throwaway cluster may be stopped"
        command = [_tool("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_postgres(command), check=True, capture_output=True)

    def resume(self) -> None:
        assert self.data_dir is not None, "only a throwaway cluster may be started"
        log = str(self.data_dir.parent / "log")
        command = [_tool("pg_ctl"), "-D", str(self.data_dir), "-o", self.options, "-l", log]
        subprocess.run(_as_postgres([*command, "-w", "start"]), check=True, capture_output=True)

    def stop(self) -> None:
        if self.data_dir is not None:
            subprocess.run(
                _as_postgres(
                    [_tool("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"]
                ),
                check=False,
                capture_output=True,
            )
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(f"{name} not found; {HOW_TO}")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root; run it as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_throwaway() -> PostgresServer:
    root = Path(tempfile.mkdtemp(prefix="chronoplane-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([_tool("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
    subprocess.run(
        _as_postgres(
            [
                _tool("pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    return PostgresServer(
        "127.0.0.1", port, "postgres", None, "postgres", data_dir=data, options=options
    )


async def find_postgres() -> PostgresServer:
    url = os.environ.get("CHRONOPLANE_TEST_POSTGRES_URL")
    if url:
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        if not await _reachable(dsn):
            raise RuntimeError(f"CHRONOPLANE_TEST_POSTGRES_URL={url} is not reachable; {HOW_TO}")
        parsed = make_url(url)
        return PostgresServer(
            parsed.host or "127.0.0.1",
            parsed.port or 5432,
            parsed.username or "postgres",
            parsed.password,
            parsed.database or "postgres",
        )
    for user in ("postgres", os.environ.get("USER") or "root"):
        local = PostgresServer("127.0.0.1", 5432, user, None, "postgres")
        if await _reachable(local.dsn):
            return local
    try:
        return await asyncio.to_thread(start_throwaway)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        raise RuntimeError(f"could not start a throwaway PostgreSQL ({error}); {HOW_TO}") from error
