"""Admin routes (app role TokenService.Admin): any identity's revocation and deletion, retention's dry run.

Under /api/manage, not /api/admin: the Functions host refuses routes that begin with "admin".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from ..errors import BadRequest, Code, NotFound
from . import bodies
from .route import Auth, Call, Limit, route

if TYPE_CHECKING:
    from ..store.record import IdentityRecord

MAX_ID_LENGTH = 256
RETENTION_PREVIEW_DEFAULT, RETENTION_PREVIEW_MAX = 100, 1000  # a mapping read per row listed or skipped


@route(auth=Auth.ADMIN, limit=Limit.MANAGE)
async def revoke(call: Call) -> func.HttpResponse:
    record = await _named_identity(call)
    return bodies.outcome(await call.clients.revocation.revoke(record, source="admin"))


@route(auth=Auth.ADMIN, limit=Limit.MANAGE)
async def delete(call: Call) -> func.HttpResponse:
    record = await _named_identity(call)
    return bodies.outcome(await call.clients.revocation.delete(record, source="admin"))


@route(auth=Auth.ADMIN, limit=Limit.MANAGE)
async def retention(call: Call) -> func.HttpResponse:
    """What retention would delete next, and not before when (already JSON: shared/cleanup/)."""
    raw = call.req.params.get("limit", str(RETENTION_PREVIEW_DEFAULT))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= RETENTION_PREVIEW_MAX:
        raise BadRequest(
            f"limit must be a whole number from 1 to {RETENTION_PREVIEW_MAX}.", code=Code.INVALID_LIMIT
        )
    return bodies.json_response(bodies.retention_preview(await call.clients.cleanup.preview(int(raw))))


async def _named_identity(call: Call) -> IdentityRecord:
    """The mapping of the ACS identity the route names, if an app user still maps to it."""
    communication_user_id = call.req.route_params.get("communicationUserId", "")
    if not communication_user_id or len(communication_user_id) > MAX_ID_LENGTH:
        raise BadRequest("communicationUserId is missing or too long.", code=Code.INVALID_IDENTITY_ID)
    store = call.clients.store
    user_key = await store.lookups.owner_of(communication_user_id)
    record = await store.identities.get(user_key) if user_key else None
    if record is None or record.communication_user_id != communication_user_id:
        raise NotFound("No app user maps to that ACS identity.", code=Code.IDENTITY_NOT_FOUND)
    return record
