"""GET /api/openapi.json: openapi.yaml, the API's contract, served as JSON.

Read and converted once per worker, on first request, so importing the app stays cheap.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import azure.functions as func

DOCUMENT = Path(__file__).resolve().parent.parent / "openapi.yaml"


@cache
def document_json() -> str:
    import yaml  # only this route needs it

    return json.dumps(yaml.safe_load(DOCUMENT.read_text(encoding="utf-8")))


def serve(_req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        document_json(),
        status_code=200,
        mimetype="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )
