"""Who may call what: the API-key rule every frontend (HTTP, gRPC, metrics) applies.

Calls fall into four kinds. ``PUBLIC`` (the chat page's static files) is always open.
``HEALTH`` (liveness/readiness) needs no key with ``--open-health``; ``CONTROL``
(repository load/unload) needs the model control key, and is refused to everyone when
an API key is set without one; ``API`` is every other call, which needs the API key
when one is set. The frontends only say which
kind a call is and where its bearer token is; this module decides.

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, so neither
the comparison time nor the key's length tells a caller how close it came.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from triserve.options import Access


class CallKind(enum.Enum):
    PUBLIC = "public"  # the chat page's static files: no data; the page sends the key on its calls
    HEALTH = "health"
    CONTROL = "model control"
    API = "api"


class Refusal(enum.Enum):
    """Why a call was refused: no/wrong key (401, UNAUTHENTICATED) or not allowed at all (403)."""

    UNAUTHENTICATED = 401
    FORBIDDEN = 403


@dataclass(frozen=True)
class Denied:
    refusal: Refusal
    message: str


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Gate:
    """The access rule of one server, built once from ``--api-key`` and friends."""

    def __init__(self, access: Access):
        self.access = access
        self._api = None if access.api_key is None else _digest(access.api_key)
        self._control = None if access.model_control_key is None else _digest(access.model_control_key)

    @property
    def enabled(self) -> bool:
        return self.access.enabled

    def check(self, kind: CallKind, token: str | None) -> Denied | None:
        """None when the call may go on, else why not (the message never echoes the token)."""
        if kind is CallKind.PUBLIC:
            return None
        if kind is CallKind.HEALTH and self.access.open_health:
            return None
        if kind is CallKind.CONTROL:
            if self._control is not None:
                return None if self._matches(token, self._control) else Denied(
                    Refusal.UNAUTHENTICATED,
                    "model control needs the model control key: send 'Authorization: Bearer <key>'"
                    if token is None else "invalid model control key")
            if self._api is not None:
                return Denied(Refusal.FORBIDDEN,
                              "model control is disabled: this server has an API key but no model "
                              "control key (start it with --model-control-key to allow load/unload)")
            return None
        if self._api is None:
            return None
        if token is None:
            return Denied(Refusal.UNAUTHENTICATED,
                          "missing API key: send it as 'Authorization: Bearer <key>'")
        return None if self._matches(token, self._api) else Denied(Refusal.UNAUTHENTICATED, "invalid API key")

    @staticmethod
    def _matches(token: str | None, digest: bytes) -> bool:
        # Always compare (a missing token against an empty digest), so timing says nothing.
        return hmac.compare_digest(_digest(token or ""), digest) and token is not None
