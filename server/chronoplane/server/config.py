"""Settings: defaults, then a TOML file, then CHRONOPLANE_* environment, then flags."""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from chronoplane.server.validation import FieldLimits

__all__ = [
    "ConfigError",
    "Settings",
    "add_arguments",
    "add_database_arguments",
    "load_settings",
]

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
    max_running: int = 1000
    """Executions this instance runs at once at most; it claims no more from the queue."""
    log_level: str = "INFO"
    log_format: str = "text"
    """text for a terminal, or json: one object per line, with the job, execution, instance
    and epoch a line is about (logs.py)."""
    insecure: bool = False
    history_max_age_days: float = 30.0
    """Executions that ended longer ago are purged; 0 keeps them forever."""
    audit_max_age_days: float = 365.0
    """Audit events older than this are purged (with the execution history); 0 keeps them."""
    purge_interval: float = 3600.0
    """Seconds between purges of execution history."""
    instance_name: str = ""
    """Shown by ListInstances; default: the host name. Several instances may share one."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats (instances, the leader) and leader-election rounds."""
    leader_timeout: float = 5.0
    """A leader not heard from for this long is deposed (PostgreSQL)."""
    instance_timeout: float = 10.0
    """An instance not heard from for this long is taken for dead: what it ran is ABANDONED."""
    schedule_horizon: float = 300.0
    """Seconds ahead the leader's timer holds jobs; later ones wait in the database's index
    (docs/decisions/0018-horizon.md). Longer: fewer reads, more memory."""
    statement_timeout: float = 60.0
    """Seconds a database statement may run (PostgreSQL); a lock is waited for at most
    leader_timeout, and a transaction may idle at most leader_timeout between statements."""
    max_watchers: int = 1000
    """Watch streams this instance serves at once; more get RESOURCE_EXHAUSTED."""
    watch_buffer: int = 1000
    """Events a watch stream may have waiting for its client before it is ended."""
    watch_progress_interval: float = 5.0
    """Seconds of quiet after which a watch stream gets a PROGRESS event."""
    event_retention: float = 3600.0
    """Seconds the watch event history is kept (a watcher may resume within it)."""
    celery_broker_url: str = ""
    """A Celery broker (redis://… or amqp://…): this server sends the executions of jobs
    with executor EXECUTOR_CELERY there. Empty: no Celery jobs."""
    celery_send_timeout: float = 5.0
    """Seconds a send to the broker may take before it counts as failed (and is retried)."""
    tls_cert: str = ""
    """PEM file of the server's certificate (chain); with tls_key, the server speaks TLS."""
    tls_key: str = ""
    tls_client_ca: str = ""
    """PEM file of the CA that signs client certificates: clients must present one (mTLS)."""
    client_roles: list[str] = field(default_factory=list)
    """``COMMON_NAME=role`` entries: the role of a client certificate with that subject CN."""
    require_auth: bool = False
    """Every call needs a token or a mapped client certificate (always, beyond loopback)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message; a larger one is RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int = 4000
    """Calls (watch streams included) served at once; more are RESOURCE_EXHAUSTED."""
    max_args_bytes: int = 64 * 1024
    """Largest args of a job or a TriggerJob, as JSON; more is INVALID_ARGUMENT."""
    max_args_depth: int = 32
    """Deepest nesting of args."""
    max_display_name: int = 256
    """Longest display_name (at most 256, what the schema stores)."""
    max_description: int = 4096
    """Longest description."""
    max_labels: int = 64
    """Most labels on a job (and in a watch filter)."""
    max_label_value: int = 255
    """Longest label value."""
    max_page_size: int = 1000
    """Most items in a page of a list call; larger page sizes are cut to it."""
    keepalive_time: float = 60.0
    """Seconds between the server's pings of an idle connection."""
    keepalive_timeout: float = 20.0
    """Seconds a ping may go unanswered before the connection is closed."""
    min_ping_interval: float = 10.0
    """Clients may ping at most this often (seconds) without data; more often, they are cut."""
    metrics_address: str = ""
    """HOST:PORT to serve Prometheus metrics on (/metrics); empty: no metrics endpoint."""
    metrics_task_labels: bool = False
    """Scheduling metrics carry a ``task`` label (one series per task name)."""
    reflection: str = "auto"
    """Server reflection: on, off, or authenticated (any valid identity); auto: on without
    authentication, authenticated with it."""
    otel_endpoint: str = ""
    """An OTLP/gRPC collector (http://host:4317): OpenTelemetry traces of RPCs and runs
    (``chronoplane[otel]``). The standard OTEL_* variables turn them on too."""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def field_limits(self) -> FieldLimits:
        return FieldLimits(
            args_bytes=self.max_args_bytes,
            args_depth=self.max_args_depth,
            display_name=self.max_display_name,
            description=self.max_description,
            labels=self.max_labels,
            label_value=self.max_label_value,
            page_size=self.max_page_size,
        )

    def auth_required(self) -> bool:
        """Credentials are required unless the server is on loopback (development) and not
        told otherwise, or runs --insecure."""
        if self.require_auth:
            return True
        return not self.is_loopback() and not self.insecure

    def certificate_roles(self) -> dict[str, str]:
        roles: dict[str, str] = {}
        for entry in self.client_roles:
            subject, sep, role = entry.rpartition("=")
            if not sep or not subject:
                raise ConfigError(f"client_roles: {entry!r} is not COMMON_NAME=role")
            roles[subject] = role.strip().lower()
        return roles

    @property
    def host(self) -> str:
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]")

    def is_loopback(self, address: str | None = None) -> bool:
        """Whether ``address`` (by default the gRPC one) is on loopback."""
        host = self.host if address is None else address.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def sqlite_path(self) -> Path | None:
        """The database file, when the database is SQLite."""
        prefix = "sqlite+aiosqlite:///"
        if not self.database_url.startswith(prefix):
            return None
        return Path(self.database_url.removeprefix(prefix).split("?")[0]).resolve()

    def _check_timing(self) -> None:
        """The fencing inequality (coordination/postgres.py): a leader whose heartbeats stop
        acts at most 2 x heartbeat_interval after its last one got through; nobody may take
        over before leader_timeout has passed since then."""
        hb = self.heartbeat_interval
        if hb <= 0:
            raise ConfigError("heartbeat_interval must be > 0")
        if 2 * hb + LEASE_MARGIN > self.leader_timeout:
            raise ConfigError(
                f"leader_timeout ({self.leader_timeout:g} s) must be at least 2 x "
                f"heartbeat_interval + {LEASE_MARGIN:g} s ({2 * hb + LEASE_MARGIN:g} s): a "
                "silent leader must stop acting before another may take over"
            )
        if self.instance_timeout < 3 * hb:
            raise ConfigError(
                f"instance_timeout ({self.instance_timeout:g} s) must be at least 3 x "
                f"heartbeat_interval ({3 * hb:g} s)"
            )

    def normalized(self) -> Settings:
        """Relative SQLite paths made absolute, checked for sense."""
        self._check_places()
        self._check_runs()
        self._check_limits()
        self._check_security()
        self._check_timing()
        if self.log_format not in {"text", "json"}:
            raise ConfigError("log_format must be text or json")
        path = self.sqlite_path()
        if path is not None:
            return replace(self, database_url=f"sqlite+aiosqlite:///{path}")
        return self

    def _check_places(self) -> None:
        """Where it listens, its database and its broker."""
        if ":" not in self.address or not self.address.rpartition(":")[2].isdigit():
            raise ConfigError(f"address {self.address!r} is not HOST:PORT")
        if self.metrics_address:
            _check_metrics_address(self.metrics_address)
        if not self.database_url.startswith(("sqlite+aiosqlite:///", "postgresql+asyncpg://")):
            raise ConfigError(
                "database_url must start with sqlite+aiosqlite:/// or postgresql+asyncpg://"
            )
        if self.celery_broker_url and not self.celery_broker_url.startswith(
            ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")
        ):
            raise ConfigError("celery_broker_url must be a redis:// or amqp:// URL")

    def _check_runs(self) -> None:
        """Runs, history, watches."""
        if self.shutdown_grace < 0 or self.worker_threads < 1 or self.max_running < 1:
            raise ConfigError(
                "shutdown_grace must be >= 0, worker_threads >= 1 and max_running >= 1"
            )
        if self.statement_timeout <= 0:
            raise ConfigError("statement_timeout must be > 0")
        if self.schedule_horizon < 1:
            raise ConfigError("schedule_horizon must be >= 1 (seconds)")
        if self.history_max_age_days < 0 or self.purge_interval <= 0:
            raise ConfigError("history_max_age_days must be >= 0 and purge_interval > 0")
        if self.celery_send_timeout <= 0:
            raise ConfigError("celery_send_timeout must be > 0")
        if self.audit_max_age_days < 0:
            raise ConfigError("audit_max_age_days must be >= 0")
        if self.max_watchers < 0 or self.watch_buffer < 1:
            raise ConfigError("max_watchers must be >= 0 and watch_buffer >= 1")
        if self.watch_progress_interval <= 0 or self.event_retention <= 0:
            raise ConfigError("watch_progress_interval and event_retention must be > 0")

    def _check_limits(self) -> None:
        """Request and transport limits."""
        if not 1 <= self.max_display_name <= 256:
            raise ConfigError("max_display_name must be between 1 and 256")
        request_limits = (
            self.max_args_bytes,
            self.max_args_depth,
            self.max_description,
            self.max_labels,
            self.max_label_value,
            self.max_page_size,
        )
        if min(request_limits) < 1:
            raise ConfigError("the max_* request limits must be at least 1")
        if self.max_message_bytes < 1024 or self.max_concurrent_rpcs < 1:
            raise ConfigError("max_message_bytes must be >= 1024 and max_concurrent_rpcs >= 1")
        if min(self.keepalive_time, self.keepalive_timeout, self.min_ping_interval) <= 0:
            raise ConfigError("keepalive_time, keepalive_timeout and min_ping_interval must be > 0")

    def _check_security(self) -> None:
        """TLS files, reflection, certificate roles."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key")
        for pem in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if pem and not Path(pem).is_file():
                raise ConfigError(f"{pem}: no such file")
        if self.reflection not in {"auto", "on", "off", "authenticated"}:
            raise ConfigError("reflection must be auto, on, off or authenticated")
        for subject, role in self.certificate_roles().items():
            if role not in {"viewer", "operator", "admin"}:
                raise ConfigError(
                    f"client_roles: {subject}={role}: roles are viewer, operator, admin"
                )


def _check_metrics_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics_address {address!r} is not HOST:PORT (--metrics-address, "
            "CHRONOPLANE_METRICS_ADDRESS)"
        )


_ENV_PREFIX = "CHRONOPLANE_"
# Slack between the end of a silent leader's lease and the earliest takeover: clock rate
# differences and scheduling delays must fit in it.
LEASE_MARGIN = 1.0


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
    """Every setting as a flag (``load_settings`` reads them)."""
    _add_basic_arguments(parser)
    _add_history_arguments(parser)
    _add_cluster_arguments(parser)
    _add_watch_arguments(parser)
    _add_celery_arguments(parser)
    _add_metrics_arguments(parser)
    _add_limit_arguments(parser)
    _add_tls_arguments(parser)
    parser.add_argument(
        "--otel-endpoint",
        metavar="URL",
        help="send OpenTelemetry traces to this OTLP/gRPC collector (chronoplane[otel])",
    )


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of commands that only open the database: --config and --database-url."""
    parser.add_argument("--config", help="TOML settings file (env CHRONOPLANE_CONFIG)")
    parser.add_argument(
        "--database-url",
        help="sqlite+aiosqlite:///path or postgresql+asyncpg://… (default ./chronoplane.db)",
    )


def _add_basic_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the server: address, database, tasks, runs, logs."""
    add_database_arguments(parser)
    parser.add_argument("--address", help="HOST:PORT to listen on (default 127.0.0.1:50051)")
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
    parser.add_argument(
        "--max-running",
        type=int,
        help="executions this instance runs at once at most (default 1000)",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="text (default) or json, a line each"
    )


def _add_history_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of how long history is kept."""
    parser.add_argument(
        "--history-max-age-days",
        type=float,
        help="purge executions that ended longer ago (default 30; 0 keeps them)",
    )
    parser.add_argument(
        "--audit-max-age-days",
        type=float,
        help="purge audit events older than this (default 365; 0 keeps them)",
    )
    parser.add_argument(
        "--purge-interval", type=float, help="seconds between history purges (default 3600)"
    )


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the cluster: names, heartbeats, timeouts."""
    parser.add_argument(
        "--instance-name", help="name shown by ListInstances (default: the host name)"
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, help="seconds between heartbeats (default 1)"
    )
    parser.add_argument(
        "--leader-timeout",
        type=float,
        help="seconds of leader silence before another instance takes over (default 5)",
    )
    parser.add_argument(
        "--instance-timeout",
        type=float,
        help="seconds of instance silence before its executions are ABANDONED (default 10)",
    )
    parser.add_argument(
        "--schedule-horizon",
        type=float,
        help="seconds ahead the leader's timer holds jobs (default 300)",
    )
    parser.add_argument(
        "--statement-timeout",
        type=float,
        help="seconds a database statement may run (PostgreSQL; default 60)",
    )


def _add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of watch streams."""
    parser.add_argument(
        "--max-watchers", type=int, help="watch streams served at once (default 1000)"
    )
    parser.add_argument(
        "--watch-buffer",
        type=int,
        help="events a watch stream may have waiting before it is ended (default 1000)",
    )
    parser.add_argument(
        "--watch-progress-interval",
        type=float,
        help="seconds of quiet before a watch stream gets a PROGRESS event (default 5)",
    )
    parser.add_argument(
        "--event-retention",
        type=float,
        help="seconds the watch event history is kept (default 3600)",
    )


def _add_celery_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of Celery dispatch."""
    celery = parser.add_argument_group("Celery")
    celery.add_argument(
        "--celery-broker-url",
        metavar="URL",
        help="send the executions of Celery jobs to this broker (redis://… or amqp://…)",
    )
    celery.add_argument(
        "--celery-send-timeout", type=float, help="seconds a send may take (default 5)"
    )


def _add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the Prometheus metrics endpoint."""
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on HOST:PORT/metrics (default: off)",
    )
    metrics.add_argument(
        "--metrics-task-labels",
        action="store_true",
        default=None,
        help="give the scheduling metrics a task label (one series per task name)",
    )


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of request and transport limits."""
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-message-bytes", type=int, help="default 4194304 (4 MiB)")
    limits.add_argument(
        "--max-concurrent-rpcs", type=int, help="calls served at once, streams too (4000)"
    )
    for flag, default in (
        ("--max-args-bytes", "65536: args of a job or TriggerJob, as JSON"),
        ("--max-args-depth", "32: nesting of args"),
        ("--max-display-name", "256 characters (the most the schema stores)"),
        ("--max-description", "4096 characters"),
        ("--max-labels", "64 labels on a job"),
        ("--max-label-value", "255 characters"),
        ("--max-page-size", "1000 items in a page of a list call"),
    ):
        limits.add_argument(flag, type=int, help=f"default {default}")
    limits.add_argument("--keepalive-time", type=float, help="seconds between server pings (60)")
    limits.add_argument(
        "--keepalive-timeout", type=float, help="seconds a ping may go unanswered (20)"
    )
    limits.add_argument(
        "--min-ping-interval", type=float, help="clients may ping at most this often (10)"
    )


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of TLS, authentication and the insecure opt-out."""
    tls = parser.add_argument_group("TLS and authentication")
    tls.add_argument("--tls-cert", metavar="PEM", help="the server's certificate (chain)")
    tls.add_argument("--tls-key", metavar="PEM", help="the server's private key")
    tls.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    tls.add_argument(
        "--client-role",
        dest="client_roles",
        action="append",
        metavar="CN=ROLE",
        help="the role of client certificates with this common name (repeatable)",
    )
    tls.add_argument(
        "--require-auth",
        action="store_true",
        default=None,
        help="require a token or client certificate on loopback too (always beyond it)",
    )
    tls.add_argument("--reflection", help="on, off, authenticated or auto (the default)")
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
