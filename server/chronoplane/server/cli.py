"""``chronoplane``: serve, migrate, and manage API tokens."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import socket
import sys
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from chronoplane.server.config import (
    ConfigError,
    Settings,
    add_arguments,
    add_database_arguments,
    load_settings,
)
from chronoplane.server.errors import AlreadyExists, InstanceConflict, StorageUnavailable
from chronoplane.server.models import AuditEvent, JSONObject

if TYPE_CHECKING:
    from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

__all__ = ["main"]

log = logging.getLogger("chronoplane.server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronoplane", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    add_arguments(serve)
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    add_arguments(migrate)
    token = commands.add_parser("token", help="create, list and revoke API tokens")
    tokens = token.add_subparsers(dest="token_command", required=True)
    create = tokens.add_parser("create", help="create a token; it is shown once")
    create.add_argument("--name", required=True, help="who or what it is for (unique)")
    create.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    create.add_argument(
        "--expires-in", type=_days, metavar="DAYS", help="it stops working after DAYS days"
    )
    add_database_arguments(create)
    listing = tokens.add_parser("list", help="list tokens (never their secrets)")
    add_database_arguments(listing)
    revoke = tokens.add_parser("revoke", help="revoke a token (within 5 s on every server)")
    revoke.add_argument("name")
    add_database_arguments(revoke)
    return parser


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < days <= 3650:
        raise argparse.ArgumentTypeError("between 0 and 3650 days")
    return days


async def _token_command(settings: Settings, args: argparse.Namespace) -> int:
    from chronoplane.server.models import Role, StoredToken
    from chronoplane.server.security import hash_secret, new_token
    from chronoplane.server.storage.migrate import upgrade
    from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

    await upgrade(settings.database_url)
    store = SqlAlchemyStore.from_url(settings.database_url)
    now = datetime.now(UTC)
    try:
        if args.token_command == "create":
            token_id, secret, token = new_token()
            expires = now + timedelta(days=args.expires_in) if args.expires_in else None
            await store.create_token(
                StoredToken(
                    id=token_id,
                    name=args.name,
                    role=Role.parse(args.role),
                    secret_hash=hash_secret(secret),
                    create_time=now,
                    expire_time=expires,
                    revoke_time=None,
                )
            )
            await _audit(store, "token create", now, {"name": args.name, "role": args.role})
            print(token)  # noqa: T201 - the one time it is shown
            return 0
        if args.token_command == "list":
            print(f"{'NAME':<24} {'ROLE':<9} {'CREATED':<20} {'EXPIRES':<20} STATUS")  # noqa: T201
            for stored in await store.list_tokens():
                status = "revoked" if stored.revoke_time else "active"
                if stored.expire_time and stored.expire_time <= now and not stored.revoke_time:
                    status = "expired"
                print(  # noqa: T201
                    f"{stored.name:<24} {stored.role.name.lower():<9} "
                    f"{_stamp(stored.create_time):<20} {_stamp(stored.expire_time):<20} {status}"
                )
            return 0
        revoked = await store.revoke_token(args.name, now=now)
        if revoked is None:
            print(f"chronoplane: no token is named {args.name!r}", file=sys.stderr)  # noqa: T201
            return 1
        await _audit(store, "token revoke", now, {"name": args.name})
        log.info("token %r revoked", args.name)
        return 0
    finally:
        await store.close()


async def _audit(store: SqlAlchemyStore, rpc: str, now: datetime, request: JSONObject) -> None:
    """Token changes go into the audit log too, as made by the operating-system user."""
    await store.record_audit(
        AuditEvent(
            time=now,
            principal=f"cli:{getpass.getuser()}@{socket.gethostname()}",
            role="admin",
            rpc=rpc,
            request=request,
        )
    )


def _stamp(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def _configure_logging(level: str, log_format: str) -> None:
    from chronoplane.server.logs import configure

    configure(level, log_format)
    # APScheduler narrates every wake-up at INFO; its warnings still show.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _check_exposure(settings: Settings) -> None:
    """Beyond loopback: TLS (and credentials, which auth_required then demands), or
    --insecure, said loudly."""
    _check_metrics_exposure(settings)
    if settings.is_loopback():
        return
    if settings.insecure:
        log.warning(
            "INSECURE: listening on %s without requiring credentials%s; anyone who can reach "
            "it can create, change and run jobs",
            settings.address,
            "" if settings.tls else " or TLS",
        )
        return
    if not settings.tls:
        raise ConfigError(
            f"refusing to listen on {settings.address}: beyond loopback the server needs TLS "
            "(--tls-cert and --tls-key) and credentials (tokens: chronoplane token create; or "
            "client certificates: --tls-client-ca); --insecure accepts anyone on the network "
            "as an administrator"
        )


def _check_metrics_exposure(settings: Settings) -> None:
    """The metrics endpoint beyond loopback: with the server's TLS, or --insecure."""
    address = settings.metrics_address
    if not address or settings.is_loopback(address) or settings.tls:
        return
    if settings.insecure:
        log.warning("INSECURE: serving metrics on %s without TLS", address)
        return
    raise ConfigError(
        f"refusing to serve metrics on {address} (metrics_address): beyond loopback the "
        "metrics endpoint needs the server's TLS (--tls-cert and --tls-key), or --insecure"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
        if args.command == "serve":  # before anything starts: a wrong --tasks is one line
            from chronoplane.server.tasks import load_modules

            load_modules(settings.tasks)
    except ConfigError as error:
        print(f"chronoplane: {error}", file=sys.stderr)  # noqa: T201
        return 2
    _configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "token":
            return asyncio.run(_token_command(settings, args))
        if args.command == "migrate":
            from chronoplane.server.storage.migrate import upgrade

            asyncio.run(upgrade(settings.database_url))
            log.info("database is up to date")
            return 0
        _check_exposure(settings)
        from chronoplane.server import tracing
        from chronoplane.server.app import serve
        from chronoplane.server.stall import quiet_collector

        if tracing.wanted(settings.otel_endpoint):
            tracing.configure(settings.otel_endpoint)
        quiet_collector()
        try:
            asyncio.run(serve(settings))
        finally:
            tracing.shutdown()
    except (ConfigError, InstanceConflict, StorageUnavailable, AlreadyExists, OSError) as error:
        log.error("%s", error)
        return 1
    _exit_without_lingering_threads()
    return 0


def _exit_without_lingering_threads(wait: float = 2.0) -> None:
    """Python's exit waits for every non-daemon thread. A synchronous task cannot be
    interrupted, and a database connection nobody closed keeps its driver thread: neither may
    hold the process open once the server has stopped. Their names and places are logged."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    tasks = [t for t in others if t.name.startswith("chronoplane-task")]
    deadline = time.monotonic() + wait
    for thread in others:
        if thread not in tasks:  # tasks are not waited for: they had the shutdown grace
            thread.join(max(0.0, deadline - time.monotonic()))
    lingering = [t for t in others if t not in tasks and t.is_alive()]
    if not tasks and not lingering:
        return
    if tasks:
        log.warning("%d synchronous tasks still running; exiting without them", len(tasks))
    frames = sys._current_frames()
    for thread in lingering:
        frame = frames.get(thread.ident or -1)
        place = "".join(traceback.format_stack(frame)) if frame is not None else "?"
        log.warning("thread %s outlived the server; exiting without it:\n%s", thread.name, place)
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
