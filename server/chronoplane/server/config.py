"""Settings: defaults, then a TOML file, then CHRONOPLANE_* environment, then flags."""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Settings", "add_arguments", "load_settings"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///chronoplane.db"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Settings:
    address: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    tasks: list[str] = field(default_factory=list)
    shutdown_grace: float = 30.0
    worker_threads: int = 8
    log_level: str = "INFO"
    insecure: bool = False
    history_max_age_days: float = 30.0
    """Executions that ended longer ago are purged; 0 keeps them forever."""
    purge_interval: float = 3600.0
    """Seconds between purges of execution history."""

    @property
    def host(self) -> str:
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]")

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def sqlite_path(self) -> Path | None:
        """The database file, when the database is SQLite."""
        prefix = "sqlite+aiosqlite:///"
        if not self.database_url.startswith(prefix):
            return None
        return Path(self.database_url.removeprefix(prefix).split("?")[0]).resolve()

    def normalized(self) -> Settings:
        """Relative SQLite paths made absolute, checked for sense."""
        if ":" not in self.address or not self.address.rpartition(":")[2].isdigit():
            raise ConfigError(f"address {self.address!r} is not HOST:PORT")
        if not self.database_url.startswith(("sqlite+aiosqlite:///", "postgresql+asyncpg://")):
            raise ConfigError(
                "database_url must start with sqlite+aiosqlite:/// or postgresql+asyncpg://"
            )
        if self.shutdown_grace < 0 or self.worker_threads < 1:
            raise ConfigError("shutdown_grace must be >= 0 and worker_threads >= 1")
        if self.history_max_age_days < 0 or self.purge_interval <= 0:
            raise ConfigError("history_max_age_days must be >= 0 and purge_interval > 0")
        path = self.sqlite_path()
        if path is not None:
            return replace(self, database_url=f"sqlite+aiosqlite:///{path}")
        return self


_ENV_PREFIX = "CHRONOPLANE_"


def _coerce(name: str, raw: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = kinds[name]
    try:
        if kind == "list[str]":
            if isinstance(raw, str):
                return [item.strip() for item in raw.split(",") if item.strip()]
            return [str(item) for item in raw]
        if kind == "bool":
            if isinstance(raw, str):
                return raw.strip().lower() in {"1", "true", "yes", "on"}
            return bool(raw)
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (env CHRONOPLANE_CONFIG)")
    parser.add_argument("--address", help="HOST:PORT to listen on (default 127.0.0.1:50051)")
    parser.add_argument(
        "--database-url",
        help="sqlite+aiosqlite:///path or postgresql+asyncpg://… (default ./chronoplane.db)",
    )
    parser.add_argument(
        "--tasks",
        action="append",
        metavar="MODULE",
        help="import MODULE to register its tasks (repeatable)",
    )
    parser.add_argument(
        "--shutdown-grace", type=float, help="seconds running executions get at shutdown"
    )
    parser.add_argument("--worker-threads", type=int, help="threads for synchronous tasks")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--history-max-age-days",
        type=float,
        help="purge executions that ended longer ago (default 30; 0 keeps them)",
    )
    parser.add_argument(
        "--purge-interval", type=float, help="seconds between history purges (default 3600)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening beyond loopback without TLS or authentication (logged loudly)",
    )


def load_settings(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or env.get(_ENV_PREFIX + "CONFIG")
    names = [f.name for f in fields(Settings)]
    if config_path:
        try:
            data = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read {config_path}: {error}") from None
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{config_path}: unknown settings {', '.join(unknown)}")
        values |= {name: _coerce(name, value) for name, value in data.items()}
    for name in names:
        raw = env.get(_ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return Settings(**values).normalized()
