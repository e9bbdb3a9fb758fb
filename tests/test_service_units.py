"""Pure parts of the service: settings, key encoding, token policy, Easy Auth principals."""

from __future__ import annotations

import base64
import json

import azure.functions as func
import pytest

from shared import policy
from shared.auth import EasyAuthAuthenticator
from shared.errors import BadRequest, SettingError, Unauthenticated
from shared.settings import load
from shared.store import keys

BASE = {
    "AUTH_ISSUER": "https://login.example.com/tenant/v2.0",
    "AUTH_AUDIENCE": "api://tokens",
    "ACS_ENDPOINT": "https://acs.example.com/",
    "TABLES_ENDPOINT": "https://acct.table.core.windows.net",
}
# What App Service's environment says with Authentication on (easyauth is refused otherwise).
EASY_AUTH = {"AUTH_MODE": "easyauth", "WEBSITE_AUTH_ENABLED": "True"}


def test_defaults_follow_the_contract():
    s = load(BASE)
    assert s.allowed_scopes == ("chat", "voip", "chat.join", "chat.join.limited", "voip.join")
    assert s.default_scopes == ("chat", "voip") and s.default_minutes == 60
    assert (s.min_minutes, s.max_minutes) == (60, 1440) and s.algorithms == ("RS256",)
    assert s.user_claim == "sub" and s.acs_connection_string is None


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"AUTH_ISSUER": ""}, "AUTH_ISSUER"),
        ({"AUTH_ISSUER": "http://idp.example.com"}, "AUTH_ISSUER"),  # plain http off loopback
        ({"AUTH_AUDIENCE": " "}, "AUTH_AUDIENCE"),
        ({"AUTH_ALGORITHMS": "RS256,HS256"}, "AUTH_ALGORITHMS"),
        ({"AUTH_ALGORITHMS": "none"}, "AUTH_ALGORITHMS"),
        ({"AUTH_MODE": "basic"}, "AUTH_MODE"),
        ({"ACS_ENDPOINT": ""}, "ACS_ENDPOINT"),
        ({"ACS_ENDPOINT": "http://acs.example.com"}, "ACS_ENDPOINT"),
        ({"ACS_CONNECTION_STRING": "nonsense"}, "ACS_CONNECTION_STRING"),
        ({"TABLES_ENDPOINT": ""}, "TABLES_ENDPOINT"),
        ({"IDENTITY_TABLE": "bad-name"}, "IDENTITY_TABLE"),
        ({"TOKEN_ALLOWED_SCOPES": "chat,email"}, "TOKEN_ALLOWED_SCOPES"),
        ({"TOKEN_ALLOWED_SCOPES": "chat", "TOKEN_DEFAULT_SCOPES": "voip"}, "TOKEN_DEFAULT_SCOPES"),
        ({"TOKEN_DEFAULT_MINUTES": "30"}, "TOKEN_DEFAULT_MINUTES"),
        ({"TOKEN_DEFAULT_MINUTES": "soon"}, "TOKEN_DEFAULT_MINUTES"),
        ({"TOKEN_MAX_MINUTES": "2000"}, "TOKEN_MAX_MINUTES"),
    ],
)
def test_bad_settings_are_named(change, name):
    with pytest.raises(SettingError) as caught:
        load({**BASE, **change})
    assert caught.value.setting == name and name in caught.value.detail
    assert caught.value.status == 503


def test_http_issuer_is_fine_on_loopback_and_settings_narrow_policy():
    s = load(
        {
            **BASE,
            "AUTH_ISSUER": "http://127.0.0.1:8444",
            "TOKEN_ALLOWED_SCOPES": "voip",
            "TOKEN_MAX_MINUTES": "120",
            "TOKEN_DEFAULT_MINUTES": "120",
        }
    )
    assert s.default_scopes == ("voip",) and s.default_minutes == 120


def test_easyauth_mode_needs_no_issuer():
    s = load({k: v for k, v in BASE.items() if not k.startswith("AUTH")} | EASY_AUTH)
    assert s.auth_mode == "easyauth"


@pytest.mark.parametrize("platform", [{}, {"WEBSITE_AUTH_ENABLED": "False"}, {"WEBSITE_AUTH_ENABLED": ""}])
def test_easyauth_is_refused_unless_the_platform_says_authentication_is_on(platform):
    """Without App Service Authentication nothing strips a client's own X-MS-CLIENT-PRINCIPAL."""
    with pytest.raises(SettingError) as caught:
        load({**BASE, "AUTH_MODE": "easyauth", **platform})
    assert caught.value.setting == "AUTH_MODE" and caught.value.status == 503
    assert caught.value.code == "configuration_error" and "WEBSITE_AUTH_ENABLED" in caught.value.detail
    assert load({**BASE, "AUTH_MODE": "easyauth", "WEBSITE_AUTH_ENABLED": "true"}).auth_mode == "easyauth"


async def test_a_forged_principal_without_platform_authentication_gets_503_naming_auth_mode(monkeypatch):
    import function_app
    from shared.compose import reset_services
    from shared.settings import reset_settings

    for name, value in {**BASE, "AUTH_MODE": "easyauth"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    reset_settings()
    await reset_services()
    forged = _principal([{"typ": "iss", "val": "https://idp"}, {"typ": "sub", "val": "someone-else"}])
    try:
        response = await function_app.issue_token(
            func.HttpRequest(method="POST", url="http://localhost/api/token", headers=forged, body=b"")
        )
        problem = json.loads(response.get_body())
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert response.mimetype == "application/problem+json"
        assert problem["code"] == "configuration_error" and "AUTH_MODE" in problem["detail"]
        probe = func.HttpRequest(method="GET", url="http://localhost/api/health", body=b"")
        health = await function_app.health(probe)
        assert health.status_code == 503
        assert json.loads(health.get_body())["checks"] == {"settings": "missing or invalid: AUTH_MODE"}
    finally:
        reset_settings()
        await reset_services()


def test_readme_says_easyauth_needs_platform_authentication_and_excluded_paths():
    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Easy Auth mode", 1)[1].split("\n## ", 1)[0]
    needles = ("WEBSITE_AUTH_ENABLED", "configuration_error", "excludedPaths", "/api/events", "/api/health")
    for needle in needles:
        assert needle in section, needle


@pytest.mark.parametrize("subject", ["a/b", "x#y?z", "back\\slash", "tab\tctl", "ü" * 500, ""])
def test_user_keys_are_legal_table_keys(subject):
    key = keys.user_key("https://issuer", subject)
    assert len(key) == 45 and not set(key) & set("/\\#?\t\n") and key.isascii()


def test_user_keys_do_not_collide_across_issuers():
    assert keys.user_key("a|b", "c") != keys.user_key("a", "b|c")
    assert keys.user_key("https://a", "x") != keys.user_key("https://b", "x")
    assert keys.user_key("https://a", "x") == keys.user_key("https://a", "x")
    assert keys.owner_row("8:acs:1") != keys.user_key("", "8:acs:1")


def test_the_retention_scan_takes_exactly_the_days_before_the_cutoff():
    user = keys.user_key("https://issuer", "alice")
    lo, hi = keys.RETENTION_PREFIX, keys.retention_bound("2026-08-27")

    def scanned(row: str) -> bool:
        return lo <= row < hi

    assert scanned(keys.retention_row("2026-08-26", user, "8:acs:1"))
    assert scanned(keys.retention_row("1999-12-31", user, "8:acs:1"))
    assert not scanned(keys.retention_row("2026-08-27", user, "8:acs:1"))  # the cutoff day itself
    assert not scanned(keys.retention_row("2026-11-25", user, "8:acs:1"))
    # The index's other rows sort outside the range.
    assert not scanned(keys.owner_row("8:acs:1"))
    assert not scanned(keys.graph_row("tid", "oid", user))


def test_an_entra_users_graph_rows_share_a_prefix_no_other_user_has():
    prefix = keys.graph_prefix("TID", "OID")
    end = keys.prefix_end(prefix)
    for user in (keys.user_key("https://a", "x"), keys.user_key("https://b", "y")):
        assert prefix <= keys.graph_row("tid", "oid", user) < end  # tid/oid compare case-blind
        assert not prefix <= keys.graph_row("tid", "oid2", user) < end


SETTINGS = load(BASE)


@pytest.mark.parametrize(
    ("body", "scopes", "minutes"),
    [
        (b"", ("chat", "voip"), 60),
        (b"  ", ("chat", "voip"), 60),
        (b"{}", ("chat", "voip"), 60),
        (b'{"scopes": ["voip", "voip", "chat.join"], "expiresInMinutes": 1440}', ("voip", "chat.join"), 1440),
    ],
)
def test_token_request_defaults_and_dedup(body, scopes, minutes):
    assert policy.token_request(body, SETTINGS) == policy.TokenRequest(scopes, minutes)


@pytest.mark.parametrize(
    "body", [b'{"expiresInMinutes": true}', b'{"scopes": [1]}', b'{"scopes": null, "x": 1}']
)
def test_token_request_rejects(body):
    with pytest.raises(BadRequest):
        policy.token_request(body, SETTINGS)


def _principal(claims: list[dict], **extra) -> dict[str, str]:
    document = {"auth_typ": "aad", "claims": claims, "name_typ": "name", "role_typ": "roles", **extra}
    return {
        "x-ms-client-principal": base64.b64encode(json.dumps(document).encode()).decode(),
        "x-ms-client-principal-idp": "aad",
    }


async def test_easyauth_principal_becomes_a_caller():
    auth = EasyAuthAuthenticator(load({**BASE, **EASY_AUTH}))
    caller = await auth.authenticate(
        _principal(
            [
                {"typ": "iss", "val": "https://login.microsoftonline.com/t/v2.0"},
                {
                    "typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
                    "val": "user-1",
                },
                {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": "oid-1"},
                {"typ": "http://schemas.microsoft.com/identity/claims/tenantid", "val": "tid-1"},
                {"typ": "roles", "val": "TokenService.Admin"},
            ]
        )
    )
    assert (caller.issuer, caller.subject, caller.object_id, caller.tenant_id) == (
        "https://login.microsoftonline.com/t/v2.0",
        "user-1",
        "oid-1",
        "tid-1",
    )
    assert caller.has_role("TokenService.Admin")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ms-client-principal": "%%%"},
        {"x-ms-client-principal": base64.b64encode(b"[]").decode()},
        _principal([{"typ": "name", "val": "no subject"}]),
    ],
)
async def test_easyauth_without_a_usable_principal_is_401(headers):
    auth = EasyAuthAuthenticator(load({**BASE, **EASY_AUTH}))
    with pytest.raises(Unauthenticated):
        await auth.authenticate(headers)
