"""HMAC verification on the emulator's side, as a pure function."""

from __future__ import annotations

import datetime as dt
from email.utils import parsedate_to_datetime

import pytest
from requests.structures import CaseInsensitiveDict

from devstack import hmac_auth
from tests.acs_signing import sdk_signed_headers

KEY = "pw=="
DATE = "Wed, 13 Apr 2022 18:09:12 GMT"
HOST = "contoso.communicationservices.azure.com"
SIGNED_HEADERS = "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
EMPTY_HASH = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def _headers(signature: str, **extra: str) -> CaseInsensitiveDict:
    return CaseInsensitiveDict(
        {
            "x-ms-date": DATE,
            "host": HOST,
            "x-ms-content-sha256": EMPTY_HASH,
            "Authorization": f"{SIGNED_HEADERS}&Signature={signature}",
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("target", "signature"),
    [
        ("/", "88MDmJhUR3m5QhFxb8ztShsSwlGrg7g/6XPnWf7QEO4="),
        ("/testPath?testQuery=yes", "il99+rd6V5O136roX/zVePCNle78HmvC4B7tu9zRH3I="),
    ],
)
def test_sdk_known_answer_vectors_verify(target, signature):
    """The vectors of the SDK's own tests/test_hmac.py."""
    import base64

    hmac_auth.verify(
        method="GET",
        target=target,
        headers=_headers(signature),
        body=b"",
        secret=base64.b64decode(KEY),
        now=parsedate_to_datetime(DATE),
    )


def test_content_hash_of_empty_body():
    assert hmac_auth.content_hash(b"") == EMPTY_HASH


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"target": "/other"}, "signature does not match"),
        ({"method": "POST"}, "signature does not match"),
        ({"body": b"{}"}, "does not match the request body"),
        ({"secret": b"another key"}, "signature does not match"),
        ({"now": parsedate_to_datetime(DATE) + dt.timedelta(minutes=16)}, "clock skew"),
        ({"now": parsedate_to_datetime(DATE) - dt.timedelta(minutes=16)}, "clock skew"),
    ],
)
def test_any_change_breaks_the_signature(change, reason):
    import base64

    call = {
        "method": "GET",
        "target": "/",
        "headers": _headers("88MDmJhUR3m5QhFxb8ztShsSwlGrg7g/6XPnWf7QEO4="),
        "body": b"",
        "secret": base64.b64decode(KEY),
        "now": parsedate_to_datetime(DATE),
    }
    call.update(change)
    with pytest.raises(hmac_auth.SignatureError, match=reason):
        hmac_auth.verify(**call)


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "not signed"),
        ("Bearer abc", "scheme"),
        ("HMAC-SHA256 Signature=abc", "SignedHeaders and Signature"),
        ("HMAC-SHA256 SignedHeaders=host;x-ms-content-sha256&Signature=abc", "x-ms-date"),
        ("HMAC-SHA256 nonsense", "malformed"),
    ],
)
def test_malformed_authorization_is_refused(authorization, reason):
    headers = _headers("x")
    if authorization is None:
        del headers["Authorization"]
    else:
        headers["Authorization"] = authorization
    with pytest.raises(hmac_auth.SignatureError, match=reason):
        hmac_auth.verify(
            method="GET", target="/", headers=headers, body=b"", secret=b"k", now=parsedate_to_datetime(DATE)
        )


def test_sdk_policy_signature_verifies_for_the_exact_path_it_signed():
    """The sync SDK signs the percent-encoded path; only that exact target verifies."""
    import base64

    conn = f"endpoint=https://{HOST}/;accesskey={base64.b64encode(b'secret').decode()}"
    encoded = "/identities/8%3Aacs%3Aabc/:issueAccessToken?api-version=2023-10-01"
    body = '{"scopes": ["chat"]}'
    headers = CaseInsensitiveDict(sdk_signed_headers(conn, "POST", f"https://{HOST}{encoded}", body))
    now = parsedate_to_datetime(headers["x-ms-date"])
    hmac_auth.verify(
        method="POST", target=encoded, headers=headers, body=body.encode(), secret=b"secret", now=now
    )
    decoded = "/identities/8:acs:abc/:issueAccessToken?api-version=2023-10-01"
    with pytest.raises(hmac_auth.SignatureError):
        hmac_auth.verify(
            method="POST", target=decoded, headers=headers, body=body.encode(), secret=b"secret", now=now
        )
