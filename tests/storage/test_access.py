"""Tokens, audit and secrets (storage/abc/access.py), on SQLite and PostgreSQL."""

from __future__ import annotations

from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


async def test_the_secret_is_created_once(store: SqlAlchemyStore) -> None:
    first = await store.get_or_create_secret("k", b"one")
    second = await store.get_or_create_secret("k", b"two")
    assert first == second == b"one"
