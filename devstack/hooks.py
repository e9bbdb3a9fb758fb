"""What the local stand-ins' test hooks share: they answer loopback callers only, and take a JSON
object (the issuer, the ACS emulator and the Graph stand-in alike)."""

from __future__ import annotations

import ipaddress
import json

from aiohttp import web


def require_loopback(request: web.Request, hooks: str) -> None:
    """403 `<hooks> answer loopback callers only` to anyone else: the hooks change what the stand-in does."""
    try:
        if request.remote and ipaddress.ip_address(request.remote).is_loopback:
            return
    except ValueError:
        pass
    raise web.HTTPForbidden(text=f"{hooks} answer loopback callers only")


async def hook_body(request: web.Request, hooks: str) -> dict:
    """A hook's JSON object body ({} when there is none); 400 for anything else."""
    require_loopback(request, hooks)
    try:
        body = await request.json() if request.can_read_body else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body
