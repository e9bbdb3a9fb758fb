"""GET /api/openapi.json: openapi.yaml, the API's contract, served as JSON.

Read and converted once per worker, on first request and off the event loop, so importing the app
stays cheap.
"""

from __future__ import annotations

import asyncio
import json
from functools import cache
from pathlib import Path

import azure.functions as func

from .route import Auth, route

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi.yaml"


@route(auth=Auth.ANONYMOUS)
async def serve(_req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        await asyncio.to_thread(document_json),
        status_code=200,
        mimetype="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


@cache
def document_json() -> str:
    import yaml  # only this route needs it

    return json.dumps(yaml.safe_load(DOCUMENT.read_text(encoding="utf-8")))
