"""A corpus of forged and broken bearer tokens: each gets 401 before any ACS or Table call.

It includes parser bombs (issue 15): JSON nested thousands deep and 5000-digit numbers in the
header or the payload. Whether deep nesting overflows depends on the interpreter and the stack;
the service bounds the depth itself, so each is a 401 problem, never a 500, everywhere.
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

import function_app
from devstack.signing import SigningKey
from shared.compose import compose, install, table_client
from shared.settings import get_settings
from tests.service_helpers import HostLog, Users, body_of, request


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


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _raw(header: bytes, payload: bytes = b"{}") -> str:
    return f"{_b64(header)}.{_b64(payload)}.{_b64(b'sig')}"


def _signed_header(u: Users) -> bytes:
    return base64.urlsafe_b64decode(u.token("x").split(".")[0] + "==")


def _with_payload(u: Users, payload: bytes) -> str:
    """A real token's header and signature over another payload (so the signature fails)."""
    header, _payload, signature = u.token("x").split(".")
    return f"{header}.{_b64(payload)}.{signature}"


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
    # Parser bombs, each within the 16 KB a bearer may have.
    "deeply-nested-header": lambda u: _raw(b'{"alg":"RS256","x":' + _nested(2500) + b"}"),
    "deeply-nested-header-with-kid": lambda u: _raw(_signed_header(u)[:-1] + b',"x":' + _nested(5000) + b"}"),
    "deeply-nested-alg": lambda u: _raw(b'{"alg":' + _nested(5000) + b"}"),
    "5000-digit-number-in-header": lambda u: _raw(_signed_header(u)[:-1] + b',"n":' + b"9" * 5000 + b"}"),
    "deeply-nested-payload": lambda u: _with_payload(u, b'{"sub":' + _nested(5000) + b"}"),
    "5000-digit-exp": lambda u: _with_payload(u, b'{"sub":"x","exp":' + b"9" * 5000 + b"}"),
    "header-is-a-nested-array": lambda u: _raw(_nested(5000)),
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
    spy = CountingTable(table_client(get_settings()))
    install(compose(get_settings(), table=spy))  # the Table client, seen from outside the service
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


# Every route a bearer reaches, with what it would otherwise act on.
BEARER_ROUTES = (
    ("POST", "token"),
    ("POST", "token/refresh"),
    ("POST", "token/revoke"),
    ("GET", "identity"),
    ("DELETE", "identity"),
    ("POST", f"manage/identities/{quote('8:acs:victim', safe='')}/revoke"),
    ("DELETE", f"manage/identities/{quote('8:acs:victim', safe='')}"),
    ("POST", "teams/token"),
)


@pytest.mark.parametrize("forge", CORPUS.values(), ids=CORPUS.keys())
def test_attack_over_http_is_a_401_problem_on_every_route(stack, emulator, forge):
    """Through the dev host and Azure's worker runtime: a 401 problem with a short challenge (no
    echo of the attacker's bytes), no ACS call, and nothing in the log that looks like a crash."""
    token = forge(Users(stack))
    log = HostLog(stack)
    before = emulator.stats()["calls"]
    for method, route in BEARER_ROUTES:
        response = requests.request(
            method,
            f"{stack['api']}/{route}",
            headers={"Authorization": f"Bearer {token}"},
            json={"teamsAccessToken": "x"} if route == "teams/token" else None,
            timeout=30,
        )
        assert response.status_code == 401, (route, response)
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert response.json()["code"] == "unauthenticated"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer") and len(challenge) < 512, (route, len(challenge))
        assert len(response.content) < 1024, (route, len(response.content))
    assert emulator.stats()["calls"] == before
    log.assert_no_error(invocations=len(BEARER_ROUTES))
