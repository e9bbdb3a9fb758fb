"""Teams users: exchange a Teams user's Entra token for an ACS token (POST /api/teams/token).

The caller is authenticated like on every route (their app bearer token); the body carries the
*Teams* token, an Entra access token for ACS's Teams scope that the client got for the Teams
user with the operator's Teams client app (TEAMS_CLIENT_APP_ID). ACS checks it and that its
`oid` is the caller's and its app the configured one; we only save it obviously hopeless calls.

Error choices, given that the caller's own bearer token was fine:
- a Teams token ACS rejects -> 400 `teams_token_invalid`, never 401: a 401 carries
  `WWW-Authenticate: Bearer` and tells clients their *bearer* is bad, which would send them
  signing the user in again in a loop while the Teams token stays as bad as it was.
- a Teams token whose `oid` is not the caller's -> 403 `teams_user_mismatch`: a caller may
  exchange only their own Teams token. We refuse early on the unverified `oid`; ACS's own
  400 "Provided AAD token issued for unexpected user." (target `userId`) maps to the same 403.
  Unverified claims only ever refuse; ACS decides everything that grants.
- a Teams token for another app than the configured one -> 400 `teams_app_mismatch` (the client
  used the wrong app); ACS refusing the configured app ("AAD application is not the expected
  one.") for a token that names it, or ACS calling our app id missing or malformed -> 503
  `configuration_error` naming TEAMS_CLIENT_APP_ID: the operator's setting is wrong, and no
  retry by the client can fix it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import telemetry
from .acs import AcsGateway, IssuedToken
from .auth import Caller, unverified_segment
from .errors import BadRequest, Code, Forbidden, ServiceError, SettingError
from .policy import parse_json_object
from .settings import TEAMS_CLIENT_APP_ID, Settings

log = logging.getLogger("acs_token_service.teams")

MAX_TEAMS_TOKEN_BYTES = 16 * 1024
TEAMS_FIELDS = frozenset({"teamsAccessToken"})
SETTING = TEAMS_CLIENT_APP_ID.name


@dataclass(frozen=True)
class TeamsTokenRequest:
    teams_token: str


@dataclass(frozen=True)
class TeamsTokenResult:
    object_id: str
    token: IssuedToken


def teams_token_request(body: bytes | None) -> TeamsTokenRequest:
    """Pure: the body must be {"teamsAccessToken": "<non-empty string, at most 16 KB>"}."""
    if body is None or not body.strip():
        raise BadRequest("The body must be a JSON object with teamsAccessToken.", code=Code.INVALID_BODY)
    fields = parse_json_object(body, max_bytes=MAX_TEAMS_TOKEN_BYTES + 1024)  # the token + its wrapper
    unknown = sorted(set(fields) - TEAMS_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}.", code=Code.UNKNOWN_FIELD)
    token = fields.get("teamsAccessToken")
    if not isinstance(token, str) or not token.strip():
        raise BadRequest("teamsAccessToken must be a non-empty string.", code=Code.INVALID_TEAMS_TOKEN)
    if len(token.encode()) > MAX_TEAMS_TOKEN_BYTES:
        raise BadRequest(
            f"teamsAccessToken is larger than {MAX_TEAMS_TOKEN_BYTES} bytes.", code=Code.INVALID_TEAMS_TOKEN
        )
    return TeamsTokenRequest(token.strip())


def unverified_claims(token: str) -> dict | None:
    """The payload of a JWT, NOT verified: only ever used to refuse early. None if not a JWT."""
    if not all(token.split(".")):
        return None
    return unverified_segment(token, 1)


def _app_of(claims: dict) -> str | None:
    app = claims.get("appid", claims.get("azp"))  # v1 tokens: appid; v2: azp
    return app if isinstance(app, str) and app else None


class TeamsExchange:
    def __init__(self, acs: AcsGateway, settings: Settings) -> None:
        self.acs = acs
        self.client_app_id = settings.teams_client_app_id

    async def exchange(self, caller: Caller, request: TeamsTokenRequest) -> TeamsTokenResult:
        if not self.client_app_id:
            raise SettingError(SETTING, "is not set: the Teams token exchange needs the Teams client app id")
        if not caller.object_id:
            raise Forbidden(
                "Exchanging a Teams token needs an Entra ID bearer token with an oid claim "
                "(the Teams user's object id).",
                code=Code.CALLER_OID_MISSING,
            )
        claims = unverified_claims(request.teams_token)
        if claims is None:
            raise BadRequest("teamsAccessToken is not a JWT.", code=Code.TEAMS_TOKEN_INVALID)
        oid = claims.get("oid")
        if isinstance(oid, str) and oid and oid.lower() != caller.object_id.lower():
            raise Forbidden(
                "The Teams token belongs to another user than the caller.", code=Code.TEAMS_USER_MISMATCH
            )
        token_app = _app_of(claims)
        if token_app is not None and token_app.lower() != self.client_app_id.lower():
            raise BadRequest(
                "The Teams token was issued to another application than this service's Teams client app.",
                code=Code.TEAMS_APP_MISMATCH,
            )
        try:
            issued = await self.acs.exchange_teams_token(
                request.teams_token, self.client_app_id, caller.object_id
            )
        except ServiceError as err:
            if err.code not in (Code.TEAMS_APP_REJECTED, Code.TEAMS_APP_INVALID):
                raise
            if err.code == Code.TEAMS_APP_REJECTED and token_app is None:  # the client's token is the suspect
                raise BadRequest(
                    "ACS refused the Teams token's application.", code=Code.TEAMS_APP_MISMATCH
                ) from None
            log.error("ACS refused the configured Teams client app: check %s", SETTING)
            raise SettingError(SETTING, "ACS does not accept this app for the Teams token exchange") from None
        telemetry.token_issued(kind="teams_user", scopes=None, identity_created=False)
        return TeamsTokenResult(caller.object_id, issued)
