"""API tokens, the audit log and server secrets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime

from chronoplane.server.models import (
    AuditEvent,
    AuditPage,
    AuditQuery,
    StoredToken,
)

__all__ = ["AccessStore"]


class AccessStore(ABC):
    """API tokens (only a hash of each secret is kept), the audit log of mutating calls, and
    the secrets every instance shares (the page-token key)."""

    @abstractmethod
    async def create_token(self, token: StoredToken) -> None:
        """Raises ``AlreadyExists`` if a token has that name."""

    @abstractmethod
    async def get_token(self, token_id: str) -> StoredToken | None: ...

    @abstractmethod
    async def list_tokens(self) -> list[StoredToken]:
        """Every token, by name."""

    @abstractmethod
    async def revoke_token(self, name: str, *, now: datetime) -> StoredToken | None:
        """Marks the named token revoked (once); returns it, or None if there is none."""

    async def record_audit(self, event: AuditEvent) -> None:
        """Appends one audit event (its id is the store's)."""
        await self.record_audits([event])

    @abstractmethod
    async def record_audits(self, events: Sequence[AuditEvent]) -> None:
        """Appends the audit events, in order, in one transaction (ids are the store's)."""

    @abstractmethod
    async def list_audit_events(
        self, query: AuditQuery, *, before: int | None, limit: int
    ) -> AuditPage:
        """Matching events, newest first, with ids below ``before``."""

    @abstractmethod
    async def purge_audit_events(self, *, before: datetime) -> int:
        """Deletes the events recorded before ``before``; returns how many."""

    @abstractmethod
    async def get_or_create_secret(self, name: str, value: bytes) -> bytes:
        """Returns the secret stored under ``name``, storing ``value`` first if there is none.
        Every instance sharing the database gets the same bytes."""
