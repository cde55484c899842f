"""Who may call what: roles, the RPC table, bearer tokens (decision 0012).

Free of gRPC: the transport finds the credentials (a bearer token, a verified client
certificate) and asks ``Authenticator.identify``; ``allowed`` says whether a role may call an
RPC. An RPC missing from the table is denied to everyone, admins too.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from chronoplane.server.errors import PermissionDenied, Unauthenticated
from chronoplane.server.models import Role, StoredToken

__all__ = [
    "MUTATING_RPCS",
    "RPC_ROLES",
    "Authenticator",
    "Identity",
    "allowed",
    "current_identity",
    "current_principal",
    "hash_secret",
    "new_token",
    "parse_token",
]


# The least role each RPC of chronoplane.v1.SchedulerService needs.
RPC_ROLES: Mapping[str, Role] = {
    "GetJob": Role.VIEWER,
    "ListJobs": Role.VIEWER,
    "GetExecution": Role.VIEWER,
    "ListExecutions": Role.VIEWER,
    "ListTasks": Role.VIEWER,
    "PreviewTrigger": Role.VIEWER,
    "ListInstances": Role.VIEWER,
    "WatchExecutions": Role.VIEWER,
    "WatchJobs": Role.VIEWER,
    "TriggerJob": Role.OPERATOR,
    "PauseJob": Role.OPERATOR,
    "ResumeJob": Role.OPERATOR,
    "CancelExecution": Role.OPERATOR,
    "BackfillJob": Role.OPERATOR,
    "CreateJob": Role.ADMIN,
    "BatchCreateJobs": Role.ADMIN,
    "UpdateJob": Role.ADMIN,
    "DeleteJob": Role.ADMIN,
    "PurgeExecutions": Role.ADMIN,
    "ListAuditEvents": Role.ADMIN,
}


# The RPCs that change something: what the audit log records.
MUTATING_RPCS = frozenset(
    {
        "CreateJob",
        "BatchCreateJobs",
        "UpdateJob",
        "DeleteJob",
        "PauseJob",
        "ResumeJob",
        "TriggerJob",
        "BackfillJob",
        "CancelExecution",
        "PurgeExecutions",
    }
)


def allowed(role: Role, rpc: str) -> bool:
    needed = RPC_ROLES.get(rpc)
    return needed is not None and role >= needed


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who calls: ``token:<name>``, ``cert:<subject>``, or ``anonymous`` (development)."""

    principal: str
    role: Role


# Who makes the call being served; set by the transport once the caller is identified.
current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "current_identity", default=None
)


def current_principal() -> str:
    """The principal of the call being served; empty outside a call (the server itself)."""
    identity = current_identity.get()
    return identity.principal if identity is not None else ""


TOKEN_PREFIX = "cpt"


def hash_secret(secret: str) -> str:
    """SHA-256: the secret is 32 random bytes, so a slow hash would add nothing."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(id, secret, the token a client sends: ``cpt_<id>_<secret>``)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return token_id, secret, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or len(token_id) != 16 or not secret:
        return None
    return token_id, secret


class Authenticator:
    """Turns credentials into an identity. Looked-up tokens are remembered for
    ``cache_seconds``: a revoked or expired token stops working within that time."""

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[StoredToken | None]],
        *,
        required: bool,
        certificate_roles: Mapping[str, Role],
        cache_seconds: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._lookup = lookup
        self.required = required
        self._certificate_roles = dict(certificate_roles)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, StoredToken | None]] = {}
        self._clock = clock

    async def identify(
        self, authorization: str | None, certificate_subject: str | None
    ) -> Identity:
        """Raises ``Unauthenticated`` for bad or missing credentials when they are required."""
        if authorization is not None:
            return await self._by_token(authorization)
        if certificate_subject is not None:
            role = self._certificate_roles.get(certificate_subject)
            if role is not None:
                return Identity(principal=f"cert:{certificate_subject}", role=role)
            if self.required:
                raise PermissionDenied(
                    f"the client certificate {certificate_subject!r} maps to no role (client_roles)"
                )
        if self.required:
            raise Unauthenticated(
                "credentials required: an 'authorization: Bearer <token>' header (see "
                "chronoplane token create) or a client certificate"
            )
        return Identity(principal="anonymous", role=Role.ADMIN)

    async def _by_token(self, authorization: str) -> Identity:
        scheme, _, token = authorization.partition(" ")
        parsed = parse_token(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise Unauthenticated("the authorization header is not 'Bearer cpt_…'")
        token_id, secret = parsed
        stored = await self._cached(token_id)
        if stored is None or not hmac.compare_digest(stored.secret_hash, hash_secret(secret)):
            raise Unauthenticated("unknown token")
        now = self._clock()
        if stored.revoke_time is not None:
            raise Unauthenticated(f"token {stored.name!r} was revoked")
        if stored.expire_time is not None and stored.expire_time <= now:
            raise Unauthenticated(f"token {stored.name!r} expired at {stored.expire_time}")
        return Identity(principal=f"token:{stored.name}", role=stored.role)

    async def _cached(self, token_id: str) -> StoredToken | None:
        now = time.monotonic()
        hit = self._cache.get(token_id)
        if hit is not None and now - hit[0] < self._cache_seconds:
            return hit[1]
        stored = await self._lookup(token_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token_id] = (now, stored)
        return stored

    def authorize(self, identity: Identity, rpc: str) -> None:
        if not allowed(identity.role, rpc):
            needed = RPC_ROLES.get(rpc)
            why = f"needs the {needed.name.lower()} role" if needed else "is not in the table"
            raise PermissionDenied(
                f"{identity.principal} ({identity.role.name.lower()}) may not call {rpc}: it {why}"
            )
