"""`Host.CORS` and `Host.CORSCredentials` of local.settings.json, applied as Core Tools does.

Core Tools puts ASP.NET Core's CORS middleware in front of every function: it answers preflights
itself (204, with CORS headers only for an allowed origin) and adds the allow headers to every
other response, so a browser app sees the same thing locally as behind Azure's platform CORS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware


def _truthy(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class CorsPolicy:
    origins: frozenset[str]  # lower-case, no trailing slash; "*" for any
    credentials: bool = False

    def __post_init__(self) -> None:
        if "*" in self.origins and self.credentials:
            # ASP.NET refuses this combination too: browsers would reject every response anyway.
            raise ValueError("Host.CORS '*' cannot be combined with Host.CORSCredentials true")

    @classmethod
    def parse(cls, origins: str | None, credentials: object = False) -> CorsPolicy | None:
        """None when no origin is configured: then OPTIONS requests go to the functions untouched."""
        allowed = frozenset(o.strip().rstrip("/").lower() for o in (origins or "").split(",") if o.strip())
        return cls(allowed, _truthy(credentials)) if allowed else None

    @classmethod
    def from_local_settings(cls, settings: Mapping) -> CorsPolicy | None:
        host = settings.get("Host") or {}
        return cls.parse(host.get("CORS"), host.get("CORSCredentials", False))

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins

    def headers(self, origin: str) -> dict[str, str]:
        if not self.allows(origin):
            return {}
        if "*" in self.origins:
            return {"Access-Control-Allow-Origin": "*"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        """Only OPTIONS with Origin and Access-Control-Request-Method; an Event Grid handshake is not."""
        return (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        )

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers["Origin"]
        headers = self.headers(origin)
        if headers:
            headers["Access-Control-Allow-Methods"] = request.headers["Access-Control-Request-Method"]
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                headers["Access-Control-Allow-Headers"] = requested
        return web.Response(status=204, headers=headers)

    def middleware(self) -> Middleware:
        @web.middleware
        async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.is_preflight(request):
                return self.preflight(request)
            response = await handler(request)
            origin = request.headers.get("Origin")
            for name, value in self.headers(origin).items() if origin else ():
                if name == "Vary" and response.headers.get("Vary"):
                    value = f"{response.headers['Vary']}, {value}"
                response.headers[name] = value  # platform CORS overrides the function's own
            return response

        return cors
