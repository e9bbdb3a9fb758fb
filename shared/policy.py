"""What a caller may ask for: scopes and lifetime, under the operator's settings. Pure functions."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import jsonlimits
from .errors import BadRequest, Code, PayloadTooLarge
from .issuers import TrustedIssuer
from .settings import SCOPES, Settings

MAX_BODY_BYTES = 16 * 1024
TOKEN_FIELDS = frozenset({"scopes", "expiresInMinutes"})


@dataclass(frozen=True)
class TokenRequest:
    scopes: tuple[str, ...]
    minutes: int


def parse_json_object(body: bytes | None, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """An optional JSON object body: empty means {}. Any malformed body is a 400 (`jsonlimits`)."""
    if body is None or not body.strip():
        return {}
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"The request body is larger than {max_bytes} bytes.")
    try:
        value = jsonlimits.loads(body)
    except jsonlimits.TooDeep:
        raise BadRequest(
            f"The request body nests deeper than {jsonlimits.MAX_DEPTH} levels.", code=Code.INVALID_JSON
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("The request body is not valid JSON.", code=Code.INVALID_JSON) from None
    except ValueError:  # the int-digit limit: a number no field here could take
        raise BadRequest(
            "The request body holds a number too long to read.", code=Code.INVALID_JSON
        ) from None
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.", code=Code.INVALID_BODY)
    return value


def token_request(
    body: bytes | None, settings: Settings, trusted: TrustedIssuer | None = None
) -> TokenRequest:
    """The request under the settings' policy, or the caller's issuer's where it has its own
    (AUTH_ISSUERS: `allowedScopes`, `maxExpiresInMinutes`)."""
    allowed, max_minutes = settings.allowed_scopes, settings.max_minutes
    if trusted is not None and trusted.allowed_scopes is not None:
        allowed = trusted.allowed_scopes
    if trusted is not None and trusted.max_minutes is not None:
        max_minutes = trusted.max_minutes
    fields = parse_json_object(body)
    unknown = sorted(set(fields) - TOKEN_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}.", code=Code.UNKNOWN_FIELD)

    scopes = fields.get("scopes", None)
    if scopes is None:
        scopes = [s for s in settings.default_scopes if s in allowed] or list(allowed[:1])
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise BadRequest("scopes must be a non-empty array of strings.", code=Code.INVALID_SCOPES)
    unknown_scopes = [s for s in scopes if s not in SCOPES]
    if unknown_scopes:
        raise BadRequest(
            f"Unknown scope(s): {', '.join(unknown_scopes)}. Known: {', '.join(SCOPES)}.",
            code=Code.UNKNOWN_SCOPE,
        )
    refused = [s for s in scopes if s not in allowed]
    if refused:
        raise BadRequest(f"Scope(s) not allowed here: {', '.join(refused)}.", code=Code.SCOPE_NOT_ALLOWED)

    minutes = fields.get("expiresInMinutes", min(settings.default_minutes, max_minutes))
    if not isinstance(minutes, int) or isinstance(minutes, bool):
        raise BadRequest("expiresInMinutes must be an integer.", code=Code.INVALID_EXPIRY)
    if not settings.min_minutes <= minutes <= max_minutes:
        raise BadRequest(
            f"expiresInMinutes must be within {settings.min_minutes}..{max_minutes}.",
            code=Code.INVALID_EXPIRY,
        )
    return TokenRequest(tuple(dict.fromkeys(scopes)), minutes)
