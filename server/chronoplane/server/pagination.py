"""Opaque, tamper-evident page tokens: a position and the query it belongs to, signed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from chronoplane.server.errors import InvalidArgument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "PageTokens", "page_size"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
_MAX_TOKEN = 512


def page_size(requested: int, maximum: int = MAX_PAGE_SIZE) -> int:
    """AIP-158: 0 means the default, above the maximum means the maximum, negative is wrong."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, maximum)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Signs with a key every instance shares (stored in the database)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, kind: str, position: str, query: Any) -> str:
        body = json.dumps({"k": kind, "p": position, "q": query}, separators=(",", ":"))
        payload = body.encode()
        return _b64(payload) + "." + _b64(self._sign(payload))

    def decode(self, token: str, kind: str, query: Any) -> str | None:
        """The position in ``token``, or None for an empty token; ``InvalidArgument`` when it
        was altered, made for another list, or for other filters."""
        if not token:
            return None
        try:
            if len(token) > _MAX_TOKEN:
                raise ValueError
            body, signature = token.split(".")
            payload = _unb64(body)
            if not hmac.compare_digest(_unb64(signature), self._sign(payload)):
                raise ValueError
            data = json.loads(payload)
        except ValueError:
            raise InvalidArgument.field(
                "page_token", "is not a token this server issued (altered or truncated?)"
            ) from None
        if data.get("k") != kind or data.get("q") != query:
            raise InvalidArgument.field(
                "page_token", "belongs to a different query: keep the filters of the first page"
            )
        position = data.get("p")
        if not isinstance(position, str):
            raise InvalidArgument.field("page_token", "is malformed")
        return position

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:16]
