"""``chronoplane``: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading

from chronoplane.server.config import ConfigError, Settings, add_arguments, load_settings
from chronoplane.server.errors import InstanceConflict, StorageUnavailable

__all__ = ["main"]

log = logging.getLogger("chronoplane.server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronoplane", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    add_arguments(serve)
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    add_arguments(migrate)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # APScheduler narrates every wake-up at INFO; its warnings still show.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _check_exposure(settings: Settings) -> None:
    if settings.is_loopback():
        return
    if not settings.insecure:
        raise ConfigError(
            f"refusing to listen on {settings.address}: beyond loopback the server needs TLS "
            "and authentication, which this version does not have yet; pass --insecure to "
            "accept anyone on the network as an administrator"
        )
    log.warning(
        "INSECURE: listening on %s without TLS or authentication; anyone who can reach it "
        "can create, change and run jobs",
        settings.address,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ConfigError as error:
        print(f"chronoplane: {error}", file=sys.stderr)  # noqa: T201
        return 2
    _configure_logging(settings.log_level)
    try:
        if args.command == "migrate":
            from chronoplane.server.storage.migrate import upgrade

            asyncio.run(upgrade(settings.database_url))
            log.info("database is up to date")
            return 0
        _check_exposure(settings)
        from chronoplane.server.app import serve

        asyncio.run(serve(settings))
    except (ConfigError, InstanceConflict, StorageUnavailable, OSError) as error:
        log.error("%s", error)
        return 1
    busy = [t for t in threading.enumerate() if t.name.startswith("chronoplane-task")]
    if busy:
        # A synchronous task cannot be interrupted; do not let it hold the process open.
        log.warning("%d synchronous tasks still running; exiting without them", len(busy))
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
