"""Alembic, driven from code: ``chronoplane migrate`` and the migration at start-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

import chronoplane.server

__all__ = ["alembic_config", "migrations_path", "upgrade"]


def migrations_path() -> Path:
    """Inside an installed wheel the scripts sit in the package; in a checkout, at the top."""
    package = Path(chronoplane.server.__file__).parent
    for candidate in (package / "migrations", package.parents[2] / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the Alembic migrations of chronoplane are missing")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["url"] = url
    return config


async def upgrade(url: str, revision: str = "head") -> None:
    """Brings the database to ``revision``; several servers may do it at once (Postgres
    serializes them with an advisory lock in env.py; SQLite with its file lock)."""
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
