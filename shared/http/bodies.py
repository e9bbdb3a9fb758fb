"""Results to answers: services return plain dataclasses, and only this module turns them into JSON
and a status code (errors: shared/http/problems.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import azure.functions as func

from ..clock import iso

if TYPE_CHECKING:  # the services load with the clients, not when the host indexes function_app
    from ..cleanup.preview import RetentionPreview
    from ..revocation import Outcome
    from ..store.record import IdentityRecord
    from ..teams import TeamsTokenResult
    from ..tokens import TokenResult


def json_response(
    body: object,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    *,
    mimetype: str = "application/json",
) -> func.HttpResponse:
    """No answer may be cached: each names a user, a token or the service's state now."""
    return func.HttpResponse(
        json.dumps(body),
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        mimetype=mimetype,
    )


def token(result: TokenResult) -> func.HttpResponse:
    return json_response(
        {
            "communicationUserId": result.communication_user_id,
            "token": result.token.token,
            "expiresOn": iso(result.token.expires_on),
            "scopes": list(result.scopes),
            "identityCreated": result.identity_created,
        }
    )


def teams_token(result: TeamsTokenResult) -> func.HttpResponse:
    return json_response(
        {
            "token": result.token.token,
            "expiresOn": iso(result.token.expires_on),
            # What MicrosoftTeamsUserIdentifier takes: the caller's own Entra object id.
            "microsoftTeamsUserId": result.object_id,
        }
    )


def identity(record: IdentityRecord) -> func.HttpResponse:
    return json_response(
        {
            "communicationUserId": record.communication_user_id,
            "createdAt": iso(record.created_at),
            "lastIssuedAt": iso(record.last_issued_at),
        }
    )


def outcome(result: Outcome) -> func.HttpResponse:
    """202 while the revocation or deletion waits in the queue for ACS, 200 once done."""
    return json_response(
        {"status": result.status, "communicationUserId": result.communication_user_id},
        status=202 if result.status == "pending" else 200,
    )


def health(checks: Mapping[str, str], healthy: bool) -> func.HttpResponse:
    """503 when degraded, so a load balancer or an availability test sees it without reading the body."""
    return json_response(
        {"status": "ok" if healthy else "degraded", "checks": dict(checks)}, status=200 if healthy else 503
    )


def subscription_validated(code: str) -> func.HttpResponse:
    """Event Grid's validation handshake (its own schema): the code echoed back."""
    return json_response({"validationResponse": code})


def events_handled(results: Mapping[str, int]) -> func.HttpResponse:
    return json_response({"results": dict(results)})


def retention_preview(preview: RetentionPreview) -> dict:
    """GET /api/manage/retention, and `python -m devstack timer cleanup --dry-run --json`."""
    return {
        "retentionDays": preview.retention_days,
        "cutoff": preview.cutoff,
        "graceMinutes": int(preview.grace.total_seconds() // 60),
        "identities": [
            {
                "communicationUserId": c.communication_user_id,
                "userKey": c.user_key,
                "lastUsedOn": c.last_used_on,
                "state": c.state,
                "notBefore": iso(c.not_before),
            }
            for c in preview.candidates
        ],
        "truncated": preview.truncated,
    }
