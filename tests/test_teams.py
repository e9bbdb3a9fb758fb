"""POST /api/teams/token: a Teams user's Entra token for ACS -> an ACS token, against the emulator.

The emulator checks the exchange as ACS does: the token must be from the (dev) Entra issuer, for
ACS's Teams audience (else 401 InvalidAccessToken), name the given app in `appid`, the app must be
the one the resource expects, and the token's `oid` must be the given user (else 400
ValidationError, target `appId` or `userId`: azure-sdk-for-python's recordings of
`test_get_token_for_teams_user_with_wrong_client_id` / `_with_wrong_user_object_id`).
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

import function_app
from devstack.acs_state import TEAMS_AUDIENCE
from devstack.issuer import object_id_for
from devstack.signing import SigningKey
from shared.compose import services
from shared.errors import BadRequest, Forbidden, PayloadTooLarge
from shared.teams import MAX_TEAMS_TOKEN_BYTES, teams_token_request, unverified_claims
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, request

OTHER_APP_ID = "0b8d3c4e-9f1a-4e55-8a1b-2c3d4e5f6a7b"


def _teams_token(users: Users, user: str, **overrides) -> str:
    """The Teams user's Entra token for ACS, as the Teams client app would get it."""
    args = {"audience": TEAMS_AUDIENCE, "app_id": users.stack["teams_app_id"]}
    return users.token(user, **(args | overrides))


async def _exchange(users: Users, caller: str | None, teams_token: str, *, bearer: str | None = None):
    token = bearer if bearer is not None else users.token(caller)
    return await function_app.teams_token(
        request("POST", "teams/token", token=token, body={"teamsAccessToken": teams_token})
    )


def _acs_claims(token: str) -> dict:
    return json.loads(base64.b64decode(token.split(".")[1] + "=="))


def _exchanges(emulator) -> int:
    return emulator.stats()["calls"]["exchangeTeamsToken"]


# ---- pure parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_body"),
        (b"{oops", "invalid_json"),
        (b"[]", "invalid_body"),
        (b"{}", "invalid_teams_token"),
        (b'{"teamsAccessToken": ""}', "invalid_teams_token"),
        (b'{"teamsAccessToken": "   "}', "invalid_teams_token"),
        (b'{"teamsAccessToken": 5}', "invalid_teams_token"),
        (b'{"teamsAccessToken": null}', "invalid_teams_token"),
        (b'{"teamsAccessToken": "a.b.c", "scopes": ["chat"]}', "unknown_field"),
        (json.dumps({"teamsAccessToken": "x" * (MAX_TEAMS_TOKEN_BYTES + 1)}).encode(), "invalid_teams_token"),
    ],
)
def test_bad_bodies_are_400_with_a_code(body, code):
    with pytest.raises(BadRequest) as caught:
        teams_token_request(body)
    assert caught.value.code == code


def test_body_limits():
    at_limit = "x" * MAX_TEAMS_TOKEN_BYTES
    assert teams_token_request(json.dumps({"teamsAccessToken": at_limit}).encode()).teams_token == at_limit
    with pytest.raises(PayloadTooLarge):
        teams_token_request(b'{"teamsAccessToken": "' + b"x" * 40_000 + b'"}')


def test_unverified_claims_only_parses():
    assert unverified_claims("not a jwt") is None
    assert unverified_claims("a.%%%.c") is None
    assert unverified_claims("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c") is None
    payload = base64.urlsafe_b64encode(b'{"oid": "x"}').decode().rstrip("=")
    assert unverified_claims(f"h.{payload}.s") == {"oid": "x"}


# ---- against the emulator -------------------------------------------------------------------------------


async def test_a_teams_user_gets_an_acs_token(service, emulator):
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-tina", _teams_token(service, "teams-tina"))
    assert response.status_code == 200, response.get_body()
    body = body_of(response)
    assert set(body) == {"token", "expiresOn", "microsoftTeamsUserId"}
    oid = object_id_for("teams-tina")
    assert body["microsoftTeamsUserId"] == oid
    assert body["expiresOn"].endswith("Z")
    assert emulator.verify(body["token"]) == {"valid": True, "reason": "valid"}
    claims = _acs_claims(body["token"])
    assert claims["skypeid"] == f"orgid:{oid}"
    assert 0 < claims["exp"] - time.time() <= 60 * 60
    assert _exchanges(emulator) == before + 1


async def test_a_teams_token_acs_rejects_is_400_not_401(service, emulator):
    """The caller's bearer is fine: a 401 (with WWW-Authenticate) would make them sign in again."""
    forged = _teams_token(service, "teams-fred", key=SigningKey.generate())
    expired = _teams_token(service, "teams-fred", now=time.time() - 7200)
    wrong_audience = _teams_token(service, "teams-fred", audience=service.stack["audience"])
    before = _exchanges(emulator)
    for teams_token in (forged, expired, wrong_audience):
        response = await _exchange(service, "teams-fred", teams_token)
        assert response.status_code == 400, response.get_body()
        assert body_of(response)["code"] == "teams_token_invalid"
        assert "WWW-Authenticate" not in response.headers
    assert _exchanges(emulator) == before + 3  # ACS decided each one


async def test_something_that_is_not_a_jwt_never_reaches_acs(service, emulator):
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-gina", "definitely-not-a-jwt")
    assert response.status_code == 400 and body_of(response)["code"] == "teams_token_invalid"
    assert _exchanges(emulator) == before


async def test_another_users_teams_token_is_refused(service, emulator):
    bobs = _teams_token(service, "teams-bob")
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-alice", bobs)
    assert response.status_code == 403 and body_of(response)["code"] == "teams_user_mismatch"
    assert _exchanges(emulator) == before  # refused on the (unverified) oid: no ACS call

    # ACS itself refuses it too: 400 ValidationError "Provided AAD token issued for unexpected
    # user." (target userId), which is the same 403, not a bad token and not our configuration.
    with pytest.raises(Forbidden) as caught:
        await services().teams.acs.exchange_teams_token(
            bobs, service.stack["teams_app_id"], object_id_for("teams-alice")
        )
    assert caught.value.code == "teams_user_mismatch"
    assert _exchanges(emulator) == before + 1


async def test_acs_refusing_the_user_is_403_through_the_route(service, emulator, monkeypatch):
    """Should another user's token get past our early check, ACS's 400 becomes the same 403."""
    monkeypatch.setattr("shared.teams.unverified_claims", lambda token: {})  # nothing read early
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-amy", _teams_token(service, "teams-bert"))
    assert response.status_code == 403, response.get_body()
    assert body_of(response)["code"] == "teams_user_mismatch"
    assert _exchanges(emulator) == before + 1  # ACS decided


async def test_a_caller_oid_acs_calls_malformed_is_403(service, emulator):
    """ACS: "Provided UserId has invalid format." (target userId): the caller names no Teams user."""
    claims = service.base_claims("odd-oid") | {"oid": "not-a-guid"}
    bearer = service.claims_token(claims)
    now = int(time.time())
    teams = service.claims_token(
        claims
        | {"aud": TEAMS_AUDIENCE, "appid": service.stack["teams_app_id"], "iat": now, "exp": now + 3600}
    )
    before = _exchanges(emulator)
    response = await _exchange(service, None, teams, bearer=bearer)
    assert response.status_code == 403, response.get_body()
    assert body_of(response)["code"] == "caller_oid_missing"
    assert _exchanges(emulator) == before + 1


async def test_a_teams_token_for_another_app_is_400(service, emulator):
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-ann", _teams_token(service, "teams-ann", app_id=OTHER_APP_ID))
    assert response.status_code == 400 and body_of(response)["code"] == "teams_app_mismatch"
    assert _exchanges(emulator) == before


async def test_acs_refusing_the_configured_app_is_a_configuration_problem(service, emulator, monkeypatch):
    """The operator set an app id that ACS does not accept: 503 naming the setting, not the caller's fault."""
    await configure(monkeypatch, service.stack, managed_identity=False, TEAMS_CLIENT_APP_ID=OTHER_APP_ID)
    before = _exchanges(emulator)
    token = _teams_token(service, "teams-otto", app_id=OTHER_APP_ID)
    response = await _exchange(service, "teams-otto", token)
    assert response.status_code == 503, response.get_body()
    problem = body_of(response)
    assert problem["code"] == "configuration_error" and "TEAMS_CLIENT_APP_ID" in problem["detail"]
    assert int(response.headers["Retry-After"]) >= 1
    assert _exchanges(emulator) == before + 1  # the emulator answered 400 "not the expected one"


async def test_acs_refusing_a_token_that_names_no_app_is_the_clients_fault(service, emulator):
    """ "AAD application is not the expected one." blames the operator only for a token naming their app."""
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-noah", _teams_token(service, "teams-noah", app_id=None))
    assert response.status_code == 400, response.get_body()
    assert body_of(response)["code"] == "teams_app_mismatch"
    assert _exchanges(emulator) == before + 1


async def test_an_app_id_acs_calls_malformed_is_a_configuration_problem(service, emulator, monkeypatch):
    """ACS: "Provided AppId has invalid format." (target appId): only ever our setting's fault."""
    monkeypatch.setattr(services().teams, "client_app_id", "invalid")  # past settings validation
    before = _exchanges(emulator)
    response = await _exchange(service, "teams-olga", _teams_token(service, "teams-olga", app_id="invalid"))
    assert response.status_code == 503, response.get_body()
    problem = body_of(response)
    assert problem["code"] == "configuration_error" and "TEAMS_CLIENT_APP_ID" in problem["detail"]
    assert _exchanges(emulator) == before + 1


async def test_without_the_setting_the_route_is_503_and_the_rest_works(service, emulator, monkeypatch):
    await configure(monkeypatch, service.stack, managed_identity=False, TEAMS_CLIENT_APP_ID="")
    response = await _exchange(service, "teams-nora", _teams_token(service, "teams-nora"))
    assert response.status_code == 503
    problem = body_of(response)
    assert problem["code"] == "configuration_error" and "TEAMS_CLIENT_APP_ID" in problem["detail"]
    token = await function_app.issue_token(request("POST", "token", token=service.token("teams-nora")))
    assert token.status_code == 200


async def test_a_bad_setting_is_named(service, emulator, monkeypatch):
    await configure(monkeypatch, service.stack, managed_identity=False, TEAMS_CLIENT_APP_ID="not-a-guid")
    response = await _exchange(service, "teams-ned", _teams_token(service, "teams-ned"))
    assert response.status_code == 503 and "TEAMS_CLIENT_APP_ID" in body_of(response)["detail"]


async def test_a_caller_without_oid_is_403(service, emulator):
    bearer = service.claims_token(service.base_claims("no-oid-user"))
    response = await _exchange(service, None, _teams_token(service, "no-oid-user"), bearer=bearer)
    assert response.status_code == 403 and body_of(response)["code"] == "caller_oid_missing"


async def test_the_caller_must_be_authenticated(service, emulator):
    response = await function_app.teams_token(
        request("POST", "teams/token", body={"teamsAccessToken": _teams_token(service, "x")})
    )
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_acs_down_is_503(service, emulator):
    emulator.faults(down=True)
    response = await _exchange(service, "teams-dora", _teams_token(service, "teams-dora"))
    assert response.status_code == 503 and body_of(response)["code"] == "acs_unavailable"


# ---- over HTTP, through the dev host (keyless, as in Azure) ----------------------------------------------


def test_teams_exchange_over_http(stack, emulator):
    users = Users(stack)
    bearer = stack.token("http-teams-tom").strip()
    teams = users.token("http-teams-tom", audience=TEAMS_AUDIENCE, app_id=stack["teams_app_id"])
    url = f"{stack['api']}/teams/token"
    ok = requests.post(
        url, json={"teamsAccessToken": teams}, headers={"Authorization": f"Bearer {bearer}"}, timeout=60
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["microsoftTeamsUserId"] == object_id_for("http-teams-tom")
    assert emulator.verify(ok.json()["token"])["valid"]

    forged = users.token(
        "http-teams-tom", audience=TEAMS_AUDIENCE, app_id=stack["teams_app_id"], key=SigningKey.generate()
    )
    bad = requests.post(
        url, json={"teamsAccessToken": forged}, headers={"Authorization": f"Bearer {bearer}"}, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["code"] == "teams_token_invalid"
    assert bad.headers["Content-Type"].startswith("application/problem+json")
    assert "WWW-Authenticate" not in bad.headers
