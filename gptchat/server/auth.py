"""The bearer API key, checked before anything else runs (so a stranger learns nothing, not even a 400).

A plain ASGI middleware rather than a dependency: it sees every route, streams pass through it
untouched, and /health stays public for load balancers. The web UI's page and static files are public
too (they hold no data): the page asks for the key and sends it with every API call.
"""

from __future__ import annotations

import hmac

from .errors import APIError

PUBLIC = {"/health", "/"}
PUBLIC_PREFIX = "/static/"


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC or scope["path"].startswith(PUBLIC_PREFIX):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key. Send it as an Authorization: Bearer header.")
        response = APIError(401, message, param=None, code="invalid_api_key").response()
        await response(scope, receive, send)
