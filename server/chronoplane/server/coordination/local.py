"""SQLite: one process per database file, enforced with an advisory lock on a file beside it;
that process always leads."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.errors import InstanceConflict

__all__ = ["FileLock", "SoleLeader"]


class FileLock:
    """Holds ``flock`` on ``<database>.lock``; the kernel drops it when the process dies."""

    def __init__(self, database_path: Path) -> None:
        self._path = database_path.with_name(database_path.name + ".lock")
        self._fd: int | None = None

    async def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InstanceConflict(
                f"another chronoplane server (pid {holder}) is using {self._path.with_suffix('')}:"
                " SQLite serves one process; use PostgreSQL to run several (cluster mode)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    async def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class SoleLeader(Coordinator):
    """The only process on its database leads from start to stop."""

    def __init__(
        self, take: Callable[[], Awaitable[int]], on_elected: Callable[[int], None]
    ) -> None:
        self._take = take
        self._on_elected = on_elected
        self._epoch: int | None = None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def acting(self) -> bool:
        return self._epoch is not None

    async def start(self) -> None:
        self._epoch = await self._take()
        self._on_elected(self._epoch)

    async def settled(self) -> None:
        return

    async def stop(self) -> None:
        self._epoch = None
