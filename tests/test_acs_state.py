"""Pure rules of the emulated ACS resource: token shape, revocation, expiry, limits, fault settings."""

from __future__ import annotations

import base64
import json
import re

import pytest

from devstack.acs_state import (
    CREATE_AND_ISSUE,
    LIMITS,
    AcsError,
    AcsResource,
    Faults,
    RateWindow,
    check_expires_in,
)
from devstack.signing import SigningKey

KEY = SigningKey.generate()


class Clock:
    def __init__(self, now: float = 1_700_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _resource(clock: Clock | None = None) -> AcsResource:
    return AcsResource(
        resource_id="2dee53b4-368b-45b4-ab52-8493fb117652",
        signing_key=KEY,
        teams_app_id="app",
        teams_issuer="http://issuer",
        teams_issuer_key=KEY,
        clock=clock or Clock(),
    )


def test_token_has_acs_claims_and_decodes_as_standard_base64():
    resource = _resource()
    for _ in range(200):
        identity = resource.create_identity()
        token = resource.issue(identity, ["chat", "voip"], 60).token
        header_b64, payload_b64, _sig = token.split(".")
        payload = json.loads(base64.b64decode(payload_b64 + "=="))
        assert payload == json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    assert header["alg"] == "RS256" and header["kid"] and header["x5t"] and header["typ"] == "JWT"
    assert payload["skypeid"] == identity.removeprefix("8:")
    assert payload["acsScope"] == "chat,voip" and payload["resourceId"] == resource.resource_id
    assert payload["csi"] == str(payload["iat"]) and payload["exp"] == payload["iat"] + 3600


def test_revocation_beats_tokens_of_the_same_second_but_not_later_ones():
    clock = Clock()
    resource = _resource(clock)
    identity = resource.create_identity()
    before = resource.issue(identity, ["chat"], 60).token
    resource.revoke(identity)
    after = resource.issue(identity, ["chat"], 60).token  # same clock reading
    assert resource.verify(before) == (False, "revoked")
    assert resource.verify(after) == (True, "valid")


def test_expired_tokens_are_invalid():
    clock = Clock()
    resource = _resource(clock)
    token = resource.issue(resource.create_identity(), ["chat"], 60).token
    clock.now += 3599
    assert resource.verify(token) == (True, "valid")
    clock.now += 1
    assert resource.verify(token) == (False, "expired")


def test_tokens_from_another_key_are_invalid():
    other = AcsResource(
        resource_id="x",
        signing_key=SigningKey.generate(),
        teams_app_id="a",
        teams_issuer="i",
        teams_issuer_key=KEY,
    )
    token = other.issue(other.create_identity(), ["chat"], 60).token
    assert _resource().verify(token)[0] is False


def test_deleted_identity_is_gone_for_good():
    resource = _resource()
    identity = resource.create_identity()
    resource.delete(identity)
    for act in (
        lambda: resource.issue(identity, ["chat"], 60),
        lambda: resource.revoke(identity),
        lambda: resource.delete(identity),
    ):
        with pytest.raises(AcsError) as caught:
            act()
        assert (caught.value.status, caught.value.code) == (401, "IdentityNotOwned")
    assert resource.stats()["liveIdentities"] == 0


@pytest.mark.parametrize("value", [59, 1441, 0, -5, "60", 60.0, True])
def test_expiry_must_be_an_integer_in_bounds(value):
    with pytest.raises(AcsError) as caught:
        check_expires_in(value)
    assert caught.value.status == 400 and caught.value.code == "ValidationError"


def test_rate_window_enforces_the_documented_limit_and_slides():
    window = RateWindow()
    limit = LIMITS["deleteIdentity"]
    assert limit == 500
    for i in range(limit):
        assert window.admit("deleteIdentity", 100.0 + i * 0.01) is None
    wait = window.admit("deleteIdentity", 110.0)
    assert wait is not None and 1 <= wait <= 31
    assert window.admit("issueAccessToken", 110.0) is None  # limits are per operation
    assert window.admit("deleteIdentity", 130.01) is None  # the first calls left the window


def test_limits_switch_answers_429_with_retry_after():
    clock = Clock()
    resource = _resource(clock)
    resource.faults.update({"limits": True})
    for _ in range(LIMITS["revokeAccessTokens"]):
        resource.check_limit("revokeAccessTokens")
    with pytest.raises(AcsError) as caught:
        resource.check_limit("revokeAccessTokens")
    assert caught.value.status == 429 and caught.value.retry_after >= 1


def _over_limit(resource: AcsResource, operation: str) -> AcsError:
    with pytest.raises(AcsError) as caught:
        resource.check_limit(operation)
    assert caught.value.status == 429 and caught.value.code == "TooManyRequests"
    return caught.value


def test_limits_true_are_acs_own_numbers_per_30_seconds_and_false_switches_them_off():
    faults = Faults()
    faults.update({"limits": True})
    assert faults.limits == {
        "createIdentity": 1000,
        "issueAccessToken": 1000,
        CREATE_AND_ISSUE: 1000,
        "revokeAccessTokens": 500,
        "deleteIdentity": 500,
        "exchangeTeamsToken": 500,
        "windowSeconds": 30.0,
    }
    faults.update({"limits": False})
    assert faults.limits is False


def test_each_operation_counts_against_its_own_limit():
    """As ACS counts them: create, issue, create-and-issue, revoke, delete and Teams exchange apart."""
    clock = Clock()
    resource = _resource(clock)
    resource.faults.update(
        {"limits": {"issueAccessToken": 2, "createIdentity": 3, CREATE_AND_ISSUE: 1, "windowSeconds": 10}}
    )
    # Operations the object does not name keep ACS's numbers; the window is the object's.
    assert resource.faults.limits["deleteIdentity"] == 500 and resource.faults.limits["windowSeconds"] == 10
    for _ in range(2):
        resource.check_limit("issueAccessToken")
    _over_limit(resource, "issueAccessToken")
    for _ in range(3):
        resource.check_limit("createIdentity")  # the issue limit does not touch creates
    _over_limit(resource, "createIdentity")
    resource.check_limit(CREATE_AND_ISSUE)  # nor create-and-issue, which is neither
    _over_limit(resource, CREATE_AND_ISSUE)
    for operation in ("revokeAccessTokens", "deleteIdentity", "exchangeTeamsToken"):
        for _ in range(LIMITS[operation]):
            resource.check_limit(operation)
        _over_limit(resource, operation)


def test_a_small_window_expires_and_retry_after_comes_from_it():
    clock = Clock()
    resource = _resource(clock)
    resource.faults.update({"limits": {"issueAccessToken": 2, "windowSeconds": 10}})
    resource.check_limit("issueAccessToken")
    clock.now += 3
    resource.check_limit("issueAccessToken")
    clock.now += 1.5
    assert _over_limit(resource, "issueAccessToken").retry_after == 6  # the first call leaves at +10
    clock.now += 5.5  # the first call left the window; the second is still in it
    resource.check_limit("issueAccessToken")
    assert _over_limit(resource, "issueAccessToken").retry_after == 4
    resource.faults.update({"retryAfterSeconds": None})
    assert _over_limit(resource, "issueAccessToken").retry_after is None
    resource.faults.update({"retryAfterSeconds": 1, "limits": {"issueAccessToken": 1, "windowSeconds": 0.25}})
    resource.check_limit("issueAccessToken")
    assert _over_limit(resource, "issueAccessToken").retry_after == 1  # never less than a second
    clock.now += 0.25
    resource.check_limit("issueAccessToken")


def test_setting_limits_again_starts_fresh_windows():
    resource = _resource()
    resource.faults.update({"limits": {"revokeAccessTokens": 1}})
    resource.check_limit("revokeAccessTokens")
    _over_limit(resource, "revokeAccessTokens")
    with pytest.raises(ValueError):
        resource.faults.update({"limits": {"revokeAccessTokens": 0}})
    _over_limit(resource, "revokeAccessTokens")  # a refused update changes nothing
    resource.faults.update({"latencyMs": 0})
    _over_limit(resource, "revokeAccessTokens")  # other faults leave the windows alone
    resource.faults.update({"limits": resource.faults.limits})  # what the hook reports is accepted back
    resource.check_limit("revokeAccessTokens")
    _over_limit(resource, "revokeAccessTokens")


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"issueToken": 5}, "unknown operation 'issueToken'"),
        ({"createUserAndToken": 5}, "unknown operation"),
        ({"issueAccessToken": 0}, "limits.issueAccessToken must be a positive integer"),
        ({"issueAccessToken": -3}, "limits.issueAccessToken"),
        ({"deleteIdentity": 1.5}, "limits.deleteIdentity"),
        ({"deleteIdentity": 2.0}, "limits.deleteIdentity"),
        ({"exchangeTeamsToken": "5"}, "limits.exchangeTeamsToken"),
        ({CREATE_AND_ISSUE: True}, f"limits.{CREATE_AND_ISSUE}"),
        ({"revokeAccessTokens": None}, "limits.revokeAccessTokens"),
        ({"windowSeconds": 0}, "limits.windowSeconds"),
        ({"windowSeconds": -1}, "limits.windowSeconds"),
        ({"windowSeconds": "10"}, "limits.windowSeconds"),
        ({"windowSeconds": True}, "limits.windowSeconds"),
        ({"windowSeconds": None}, "limits.windowSeconds"),
        ({"windowSeconds": 3601}, "limits.windowSeconds"),
        ({"windowSeconds": float("nan")}, "limits.windowSeconds"),
        ({"windowSeconds": float("inf")}, "limits.windowSeconds"),
        (1, "limits must be true, false or an object"),
        ("on", "limits must be"),
        ([], "limits must be"),
        (None, "limits must be"),
    ],
)
def test_bad_limits_are_refused_naming_the_field_and_change_nothing(limits, field):
    faults = Faults()
    faults.update({"limits": {"issueAccessToken": 7}})
    before = faults.limits
    with pytest.raises(ValueError, match=re.escape(field)):
        faults.update({"latencyMs": 5, "limits": limits})
    assert faults.limits is before and faults.latencyMs == 0


def test_faults_update_is_all_or_nothing():
    faults = Faults()
    with pytest.raises(ValueError, match="errorRate"):
        faults.update({"latencyMs": 50, "errorRate": 3})
    assert faults.latencyMs == 0
    faults.update({"latencyMs": 50, "errorRate": 1})
    assert (faults.latencyMs, faults.errorRate) == (50, 1.0)


def test_retry_after_can_be_switched_off_for_every_429():
    """null: throttled and over-limit 429s alike come without Retry-After (ACS promises none)."""
    faults = Faults()
    faults.update({"retryAfterSeconds": None})
    assert faults.retryAfterSeconds is None
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="retryAfterSeconds"):
            faults.update({"retryAfterSeconds": bad})
    assert faults.retryAfterSeconds is None
    resource = _resource()
    resource.faults.update({"limits": True, "retryAfterSeconds": None})
    for _ in range(LIMITS["revokeAccessTokens"]):
        resource.check_limit("revokeAccessTokens")
    with pytest.raises(AcsError) as caught:
        resource.check_limit("revokeAccessTokens")
    assert caught.value.status == 429 and caught.value.retry_after is None


@pytest.mark.parametrize("bad", [-1, 901, "5", True, None])
def test_revocation_delay_is_seconds_up_to_acs_own_15_minutes(bad):
    faults = Faults()
    faults.update({"revocationDelaySeconds": 0.25})
    assert faults.revocationDelaySeconds == 0.25
    with pytest.raises(ValueError, match="revocationDelaySeconds"):
        faults.update({"revocationDelaySeconds": bad})
    assert faults.revocationDelaySeconds == 0.25


def test_revocation_takes_effect_after_the_propagation_delay():
    """ACS: revocation "can take up to 15 minutes to propagate"; the delay fault simulates that."""
    clock = Clock()
    resource = _resource(clock)
    identity = resource.create_identity()
    first = resource.issue(identity, ["chat"], 60).token
    resource.faults.update({"revocationDelaySeconds": 60})
    resource.revoke(identity)
    later = resource.issue(identity, ["chat"], 60).token
    assert resource.verify(first) == (True, "valid: revocation not yet propagated")
    assert resource.verify(later) == (True, "valid")
    clock.now += 59.9
    assert resource.verify(first)[0] is True
    clock.now += 0.1
    assert resource.verify(first) == (False, "revoked")
    assert resource.verify(later) == (True, "valid")


def test_an_earlier_revocation_stays_in_effect_while_a_later_one_propagates():
    clock = Clock()
    resource = _resource(clock)
    identity = resource.create_identity()
    first = resource.issue(identity, ["chat"], 60).token
    resource.revoke(identity)  # no delay: in effect now
    second = resource.issue(identity, ["chat"], 60).token
    resource.faults.update({"revocationDelaySeconds": 30})
    resource.revoke(identity)
    assert resource.verify(first) == (False, "revoked")
    assert resource.verify(second) == (True, "valid: revocation not yet propagated")
    clock.now += 30
    assert resource.verify(second) == (False, "revoked")


def test_stats_count_the_429s_answered_for_the_limits_by_limited_operation():
    """What a storm benchmark reads: how many calls ACS refused, create-and-issue apart."""
    resource = _resource()
    assert resource.stats()["limited"] == dict.fromkeys(LIMITS, 0)
    resource.check_limit("issueAccessToken")  # limits off: nothing refused, nothing counted
    resource.faults.update({"limits": {"issueAccessToken": 1, CREATE_AND_ISSUE: 2}})
    resource.check_limit("issueAccessToken")
    for _ in range(3):
        _over_limit(resource, "issueAccessToken")
    for _ in range(2):
        resource.check_limit(CREATE_AND_ISSUE)
    _over_limit(resource, CREATE_AND_ISSUE)
    limited = resource.stats()["limited"]
    assert (limited["issueAccessToken"], limited[CREATE_AND_ISSUE], limited["createIdentity"]) == (3, 1, 0)
    resource.reset()
    assert resource.stats()["limited"] == dict.fromkeys(LIMITS, 0)
