"""GET /api/demo: the browser demo page, served only when DEMO_PAGE_ENABLED is true.

One self-contained HTML answer: the page (shared/demo/index.html) with its script inlined
(demo/app.bundle.js, @azure/communication-common bundled by esbuild from demo/app.js), so the
page needs no other route and loads nothing from anywhere else. A strict Content-Security-Policy
allows exactly that inline script and style (by hash) and requests to this origin only.

The page signs its user in without the service ever minting a user token: on the local stack the
dev host (devstack, not this package) offers a dev sign-in route; anywhere else the user pastes a
bearer token from the app's identity provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from functools import cache
from pathlib import Path

import azure.functions as func

from ..errors import Code, NotFound
from ..settings import get_settings
from .route import Auth, route

PAGE_DIR = Path(__file__).resolve().parent.parent / "demo"
SCRIPT_PLACEHOLDER = "/*APP*/"


@route(auth=Auth.ANONYMOUS)
async def serve(_req: func.HttpRequest) -> func.HttpResponse:
    if not get_settings().demo_page_enabled:
        raise NotFound("The demo page is off (DEMO_PAGE_ENABLED).", code=Code.DEMO_PAGE_DISABLED)
    body, csp = await asyncio.to_thread(page)  # its files are read once, off the event loop
    return func.HttpResponse(
        body,
        status_code=200,
        mimetype="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
        },
    )


@cache
def page() -> tuple[bytes, str]:
    """The page with its script inlined, and the CSP that allows exactly that page."""
    html = (PAGE_DIR / "index.html").read_text()
    script = (PAGE_DIR / "app.bundle.js").read_text()
    if "</script" in script.lower():
        raise ValueError("the bundle must not contain '</script'")
    html = html.replace(SCRIPT_PLACEHOLDER, script)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256(script)}",
            "style-src " + " ".join(_sha256(s) for s in styles),
            "connect-src 'self'",
            "img-src data:",  # the empty favicon
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html.encode(), csp


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
