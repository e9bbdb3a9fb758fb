"""HMAC-SHA256 request signatures, as ACS verifies them.

The string to sign is `VERB\\n<path-and-query>\\n<values of the signed headers joined by ';'>`,
where the path is the request target exactly as the client sent it. That one rule covers both
SDK transports: the sync client percent-encodes the identity id in the URL it sends and signs,
the aio client sends and signs it decoded. Verifying against anything else (a normalised or
decoded path) would accept signatures the real service rejects.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

SCHEME = "HMAC-SHA256"
REQUIRED_SIGNED_HEADERS = ("x-ms-date", "host", "x-ms-content-sha256")
MAX_CLOCK_SKEW = dt.timedelta(minutes=15)


class SignatureError(Exception):
    """The request is not signed by the holder of the access key; `str()` says why."""


def content_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def string_to_sign(method: str, path_and_query: str, signed_values: list[str]) -> str:
    return f"{method.upper()}\n{path_and_query}\n{';'.join(signed_values)}"


def sign(secret: bytes, text: str) -> str:
    return base64.b64encode(hmac.new(secret, text.encode("utf-8"), hashlib.sha256).digest()).decode("ascii")


def _parse_authorization(value: str) -> tuple[list[str], str]:
    scheme, _, params = value.strip().partition(" ")
    if scheme != SCHEME:
        raise SignatureError(f"authorization scheme must be {SCHEME}")
    fields: dict[str, str] = {}
    for part in params.strip().split("&"):
        name, sep, val = part.partition("=")
        if not sep:
            raise SignatureError("malformed HMAC authorization header")
        # Signature is base64 and may itself end in '='; partition keeps them.
        fields[name.strip()] = val
    if "SignedHeaders" not in fields or "Signature" not in fields:
        raise SignatureError("HMAC authorization needs SignedHeaders and Signature")
    signed = [h.strip().lower() for h in fields["SignedHeaders"].split(";") if h.strip()]
    return signed, fields["Signature"]


def verify(
    *,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    secret: bytes,
    now: dt.datetime,
) -> None:
    """Raise SignatureError unless the request carries a valid, fresh signature over its body.

    `headers` must look names up case-insensitively (aiohttp's and requests' mappings do).
    """
    authorization = headers.get("Authorization")
    if not authorization:
        raise SignatureError("the request is not signed")
    signed_headers, signature = _parse_authorization(authorization)
    missing = [h for h in REQUIRED_SIGNED_HEADERS if h not in signed_headers]
    if missing:
        raise SignatureError(f"SignedHeaders must include {', '.join(missing)}")

    values = []
    for name in signed_headers:
        value = headers.get(name)
        if value is None:
            raise SignatureError(f"signed header {name} is missing from the request")
        values.append(value)

    if not hmac.compare_digest(headers["x-ms-content-sha256"], content_hash(body)):
        raise SignatureError("x-ms-content-sha256 does not match the request body")

    try:
        signed_at = parsedate_to_datetime(headers["x-ms-date"])
    except (TypeError, ValueError):
        raise SignatureError("x-ms-date is not an RFC 1123 date") from None
    if signed_at.tzinfo is None or abs(now - signed_at) > MAX_CLOCK_SKEW:
        raise SignatureError("x-ms-date is outside the allowed clock skew")

    expected = sign(secret, string_to_sign(method, target, values))
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("the signature does not match")
