"""A corpus of forged and broken bearer tokens: each gets 401 before any ACS or Table call."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

import function_app
from devstack.keys import SigningKey
from shared.clients import get_clients
from tests.service_helpers import Users, body_of, request


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict, claims: dict) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def alg_none(u: Users) -> str:
    return _segments({"alg": "none", "typ": "JWT", "kid": u.key.kid}, u.base_claims()) + "."


def hs256_with_public_key(u: Users) -> str:
    """The classic key-confusion attack: HMAC keyed with the issuer's published RSA key."""
    pem = u.key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    signing_input = _segments({"alg": "HS256", "typ": "JWT", "kid": u.key.kid}, u.base_claims())
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tampered_payload(u: Users) -> str:
    header, _payload, signature = u.token("victim").split(".")
    forged = _b64(json.dumps({**u.base_claims("attacker"), "sub": "victim"}).encode())
    return f"{header}.{forged}.{signature}"


def non_json_segments(u: Users) -> str:
    return f"{_b64(b'not json')}.{_b64(b'also not json')}.{_b64(b'sig')}"


CORPUS = {
    "alg-none": alg_none,
    "hs256-with-public-key": hs256_with_public_key,
    "expired": lambda u: u.token("x", now=time.time() - 7200),
    "nbf-in-future": lambda u: u.claims_token({**u.base_claims(), "nbf": int(time.time()) + 3600}),
    "wrong-iss": lambda u: u.token("x", issuer="https://evil.example"),
    "wrong-aud": lambda u: u.token("x", audience="api://other"),
    "unknown-kid": lambda u: u.claims_token(u.base_claims(), headers={"kid": "not-a-published-kid"}),
    "signed-by-another-key": lambda u: u.claims_token(u.base_claims(), key=SigningKey.generate()),
    "tampered-payload": tampered_payload,
    "missing-user-claim": lambda u: u.claims_token({k: v for k, v in u.base_claims().items() if k != "sub"}),
    "empty-user-claim": lambda u: u.claims_token({**u.base_claims(), "sub": ""}),
    "no-exp": lambda u: u.claims_token({k: v for k, v in u.base_claims().items() if k != "exp"}),
    "non-json-segments": non_json_segments,
    "two-segments": lambda u: u.token("x").rsplit(".", 1)[0],
    "garbage": lambda u: "!!!.???.***",
    "rs512-when-only-rs256-allowed": lambda u: jwt.encode(
        u.base_claims(), u.key.private_key, algorithm="RS512", headers={"kid": u.key.kid}
    ),
    "oversized-16kb": lambda u: u.claims_token({**u.base_claims(), "pad": "A" * 17_000}),
}


class CountingTable:
    """A spy around the real aio TableClient: counts calls, changes nothing."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self.calls += 1
            return attribute(*args, **kwargs)

        return counted


@pytest.mark.parametrize("forge", CORPUS.values(), ids=CORPUS.keys())
async def test_attack_gets_401_with_no_backend_call(service, emulator, forge):
    store = get_clients().store
    spy = store.table = CountingTable(store.table)
    acs_before = emulator.stats()["calls"]
    for handler, route in (
        (function_app.issue_token, "token"),
        (function_app.refresh_token, "token/refresh"),
        (function_app.revoke_tokens, "token/revoke"),
    ):
        response = await handler(request("POST", route, token=forge(service)))
        assert response.status_code == 401, body_of(response)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert spy.calls == 0
    assert emulator.stats()["calls"] == acs_before


def test_64kb_token_over_http_is_refused_without_backend_calls(stack, emulator):
    users = Users(stack)
    token = users.claims_token({**users.base_claims(), "pad": "A" * 64 * 1024})
    before = emulator.stats()
    response = requests.post(
        f"{stack['api']}/token", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code in (400, 401, 431)
    assert emulator.stats() == before
