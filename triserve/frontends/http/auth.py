"""API-key check for the HTTP and metrics ports, in front of every route (ASGI middleware).

The rule itself (which key each kind of call needs) is :mod:`triserve.frontends.auth`;
this module only classifies the request by its path and reads its bearer token. A refused
request is answered before its body is read (401 with ``WWW-Authenticate: Bearer``, or
403 for model control that the server does not allow).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from triserve.frontends.auth import CallKind, Denied, Gate, Refusal, bearer_token
from triserve.frontends.http.refusal import refuse

_HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_MODEL_CONTROL = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")
# The chat page (frontends/http/ui): a browser cannot send a bearer token when it opens a page,
# so the page loads without one and asks for the key, which its own API calls then carry.
_PAGE = re.compile(r"^/(ui(/[^/]*)?)?$")
_AUTHORIZATION = b"authorization"


def call_kind(method: str, path: str) -> CallKind:
    if method in ("GET", "HEAD") and _PAGE.match(path):
        return CallKind.PUBLIC
    if path in _HEALTH_PATHS:
        return CallKind.HEALTH
    if _MODEL_CONTROL.match(path):
        return CallKind.CONTROL
    return CallKind.API


class AuthMiddleware:
    """Refuses HTTP requests whose key the :class:`Gate` does not accept."""

    def __init__(self, app: ASGIApp, gate: Gate):
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.gate.enabled:
            await self.app(scope, receive, send)
            return
        denied = self.denied(scope)
        if denied is None:
            await self.app(scope, receive, send)
            return
        await self.refuse(scope, send, denied)

    def denied(self, scope: Scope) -> Denied | None:
        """Why the :class:`Gate` refuses this HTTP request, or None when it may go on."""
        authorization = None
        for name, value in scope["headers"]:
            if name == _AUTHORIZATION:
                authorization = value.decode("latin-1")
                break
        return self.gate.check(call_kind(scope["method"], scope["path"]), bearer_token(authorization))

    @staticmethod
    async def refuse(scope: Scope, send: Send, denied: Denied) -> None:
        """Answer a refused request (401 or 403) and close the connection: its body stays unread."""
        if denied.refusal is Refusal.UNAUTHENTICATED:
            await refuse(scope, send, 401, denied.message, openai_code="invalid_api_key",
                         headers=[(b"www-authenticate", b"Bearer")], close=True)
        else:
            await refuse(scope, send, 403, denied.message, close=True)
