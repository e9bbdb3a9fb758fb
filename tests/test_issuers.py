"""Several trusted issuers (issue 19; shared/issuers.py): AUTH_ISSUERS lists them, each with its own
audience, algorithms, user claim, keys and policy, and an Entra multi-tenant template with a tenant
allow-list. Against the stack's dev issuers over HTTP (devstack/issuer.py): the plain one, an
Entra-style multi-tenant one (per-tenant `iss`, one key set, a `common` discovery document naming
the template, as login.microsoftonline.com's does), and a second plain one with a key of its own.

Entra's rules, as Microsoft.Identity.Web applies them to multi-tenant apps (AadIssuerValidator): the
`iss` of a token from tenant T is the template with T in place of `{tenantid}`, the key set is the
common one, and the `tid` claim must be the tenant the `iss` names.
"""

from __future__ import annotations

import json
import uuid

import jwt
import pytest
import requests

import function_app
from devstack.issuer import ENTRA_TENANTS, mint_user_token, object_id_for
from devstack.layout import ISSUER_KEY_FILES
from devstack.signing import SigningKey
from shared.compose import reset_services, services
from shared.errors import SettingError
from shared.issuers import TrustedIssuer, TrustedIssuers, parse
from shared.settings import SAFE_ALGORITHMS, SCOPES, SINGLE_ISSUER, load, reset_settings
from tests.service_fixtures import configure, trust_only
from tests.service_helpers import body_of, deliver, graph_user_event, post, request

TENANT_A, TENANT_B, TENANT_C = ENTRA_TENANTS
TEMPLATE = "https://login.microsoftonline.com/{tenantid}/v2.0"
BASE = {"ACS_ENDPOINT": "https://a.example", "TABLES_ENDPOINT": "https://t.example"}


def _parse(entries: list) -> tuple[TrustedIssuer, ...]:
    return parse(json.dumps(entries), safe_algorithms=SAFE_ALGORITHMS, scopes=SCOPES)


# ---- the list and its selection ------------------------------------------------------------------------


def test_an_iss_selects_its_exact_issuer_or_an_allowed_tenant_of_a_template():
    trusted = TrustedIssuers(
        _parse(
            [
                {"issuer": "https://idp.example", "audiences": "api"},
                {"issuer": TEMPLATE, "audiences": ["api"], "tenants": [TENANT_A.upper()], "userClaim": "oid"},
            ]
        )
    )
    exact, tenant = trusted.select("https://idp.example")
    assert exact.issuer == "https://idp.example" and tenant is None
    entra, tenant = trusted.select(TEMPLATE.replace("{tenantid}", TENANT_A))
    assert entra.issuer == TEMPLATE and tenant == TENANT_A and entra.user_claim == "oid"
    for refused in (
        TEMPLATE.replace("{tenantid}", TENANT_B),  # not on the allow-list
        TEMPLATE.replace("{tenantid}", "common"),
        TEMPLATE.replace("{tenantid}", f"{TENANT_A}/x"),  # a path dressed as a tenant
        TEMPLATE,  # the template itself
        "https://idp.example/",  # compared verbatim
        "https://evil.example",
        None,
        ["https://idp.example"],
    ):
        assert trusted.select(refused) is None, refused


def test_tenant_ids_in_iss_are_taken_as_entra_writes_them_only():
    trusted = TrustedIssuers(_parse([{"issuer": TEMPLATE, "audiences": "a", "tenants": [TENANT_A]}]))
    assert (
        trusted.select(TEMPLATE.replace("{tenantid}", TENANT_A.upper())) is None
    )  # another iss: another key


def test_an_exact_issuer_may_not_shadow_a_tenant_of_a_template():
    with pytest.raises(ValueError, match="is a tenant of"):
        _parse(
            [
                {"issuer": TEMPLATE, "audiences": "a", "tenants": [TENANT_A]},
                {"issuer": TEMPLATE.replace("{tenantid}", TENANT_A), "audiences": "b"},
            ]
        )


def test_admin_roles_are_granted_only_where_named_and_never_by_a_template():
    exact, template = _parse(
        [
            {"issuer": "https://idp.example", "audiences": "a"},
            {"issuer": TEMPLATE, "audiences": "a", "tenants": [TENANT_A]},
        ]
    )
    assert exact.admin_role is None and template.admin_role is None
    with pytest.raises(ValueError, match="adminRole"):
        _parse([{"issuer": TEMPLATE, "audiences": "a", "tenants": [TENANT_A], "adminRole": "Admin"}])


def test_a_single_auth_issuer_with_a_placeholder_is_refused_not_any_tenant():
    with pytest.raises(SettingError) as refused:
        load({**BASE, "AUTH_ISSUER": TEMPLATE, "AUTH_AUDIENCE": "api"})
    assert refused.value.setting == "AUTH_ISSUER"


def test_any_tenant_is_accepted_only_when_the_entry_says_so():
    (entry,) = _parse([{"issuer": TEMPLATE, "audiences": "api", "anyTenant": True}])
    assert entry.tenant_of(TEMPLATE.replace("{tenantid}", TENANT_C)) == TENANT_C
    with pytest.raises(ValueError, match="anyTenant"):
        _parse([{"issuer": TEMPLATE, "audiences": "api"}])  # no allow-list: refused, not "any"


@pytest.mark.parametrize(
    "entries, names",
    [
        ("not json", "JSON array"),
        ([], "at least one"),
        ([{"audiences": "a"}], r"\[0\].issuer"),
        ([{"issuer": "https://i.example"}], r"\[0\].audiences"),
        ([{"issuer": "https://i.example", "audiences": "a", "algorithms": ["HS256"]}], "HS256 not allowed"),
        ([{"issuer": "https://i.example", "audiences": "a", "tenants": [TENANT_A]}], "naming {tenantid}"),
        ([{"issuer": TEMPLATE, "audiences": "a", "tenants": ["contoso"]}], "not tenant ids"),
        ([{"issuer": TEMPLATE, "audiences": "a", "tenants": [TENANT_A], "anyTenant": True}], "not both"),
        ([{"issuer": "https://i.example", "audiences": "a", "allowedScopes": ["email"]}], "unknown email"),
        ([{"issuer": "https://i.example", "audiences": "a", "color": "red"}], "unknown field"),
        ([{"issuer": "https://{tenant}/v2.0", "audiences": "a"}], "only placeholder"),
        ([{"issuer": "https://i.example", "audiences": "a"}] * 2, "listed twice"),
        ("[" * 100_000, "JSON array"),  # nested past any parser's stack: a clear error, never a 500
    ],
)
def test_a_wrong_issuer_list_names_what_is_wrong(entries, names):
    with pytest.raises(ValueError, match=names):
        parse(
            entries if isinstance(entries, str) else json.dumps(entries),
            safe_algorithms=SAFE_ALGORITHMS,
            scopes=SCOPES,
        )


def test_the_single_issuer_settings_are_one_trusted_issuer_as_before():
    settings = load(
        {**BASE, "AUTH_ISSUER": "https://idp.example", "AUTH_AUDIENCE": "api", "AUTH_USER_CLAIM": "oid"}
    )
    assert settings.trusted_issuers == (TrustedIssuer("https://idp.example", ("api",), ("RS256",), "oid"),)
    assert settings.object_id_issuer == "https://idp.example"


def test_auth_issuers_replaces_the_single_issuer_settings_and_checks_the_rest():
    listed = json.dumps([{"issuer": "https://idp.example", "audiences": "api", "maxExpiresInMinutes": 120}])
    settings = load({**BASE, "AUTH_ISSUERS": listed})
    assert [t.issuer for t in settings.trusted_issuers] == ["https://idp.example"]
    assert settings.object_id_issuer is None  # Graph lookup rows for every issuer's users
    for single in SINGLE_ISSUER:
        with pytest.raises(SettingError) as both:
            load({**BASE, "AUTH_ISSUERS": listed, single.name: "x"})
        assert both.value.setting == "AUTH_ISSUERS"
    for wrong, says in (
        ([{"issuer": "http://idp.example", "audiences": "a"}], "https"),
        ([{"issuer": "https://idp.example", "audiences": "a", "maxExpiresInMinutes": 30}], "60..1440"),
        ([{"issuer": "https://[x/", "audiences": "a"}], "https URL"),
        (
            [{"issuer": "https://idp.example", "audiences": "a", "metadata": "http://idp.example/m"}],
            "metadata",
        ),
    ):
        with pytest.raises(SettingError, match=says):
            load({**BASE, "AUTH_ISSUERS": json.dumps(wrong)})


# ---- on the stack --------------------------------------------------------------------------------------


class Issuers:
    """Tokens from each of the stack's dev issuers, and forgeries across them."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.iss = stack["issuers"]
        self.keys = {name: SigningKey.load(stack.state_dir / f) for name, f in ISSUER_KEY_FILES.items()}

    def entra_iss(self, tenant: str) -> str:
        return self.iss["entra"].replace("{tenantid}", tenant)

    def token(
        self, issuer: str, user: str, *, tenant: str | None = None, key: str | None = None, **claims
    ) -> str:
        """`issuer`'s token (`tenant`: an Entra tenant), signed with `key`'s key (default: its own)."""
        if issuer == "entra":
            tenant = tenant or TENANT_A
        iss = self.entra_iss(tenant) if issuer == "entra" and tenant else self.iss[issuer]
        token = mint_user_token(
            key=self.keys[key or issuer],
            issuer=iss,
            audience=self.stack["audience"],
            user=user,
            tenant_id=tenant or self.stack["tenant_id"],
            roles=claims.pop("roles", ()),
        )
        if not claims:
            return token
        payload = {**jwt.decode(token, options={"verify_signature": False}), **claims}
        signing = self.keys[key or issuer]
        return jwt.encode(payload, signing.private_key, algorithm="RS256", headers={"kid": signing.kid})

    def requests_served(self) -> int:
        return requests.get(self.stack["issuer"] + "/_issuer/stats", timeout=10).json()["calls"]["any"]


@pytest.fixture
async def issuers(stack, emulator, monkeypatch):
    """The service trusting three issuers: the dev one (sub; its admins hold TokenService.Admin),
    the Entra-style one for tenants A and B (oid; no admins: each tenant assigns its own roles),
    and the second one, whose users may only chat, for 2 hours at most, and whose admins hold
    another role."""
    entries = [
        {
            "issuer": stack["issuers"]["dev"],
            "audiences": stack["audience"],
            "adminRole": "TokenService.Admin",
        },
        {
            "issuer": stack["issuers"]["entra"],
            "audiences": [stack["audience"]],
            "tenants": [TENANT_A, TENANT_B],
            "userClaim": "oid",
        },
        {
            "issuer": stack["issuers"]["second"],
            "audiences": stack["audience"],
            "allowedScopes": ["chat"],
            "maxExpiresInMinutes": 120,
            "adminRole": "Second.Admin",
        },
    ]
    await configure(monkeypatch, stack, managed_identity=False)
    await trust_only(monkeypatch, entries)
    yield Issuers(stack)
    await reset_services()
    reset_settings()


def _refused(response) -> bool:
    return response.status_code == 401 and "Bearer" in response.headers["WWW-Authenticate"]


async def test_each_issuer_and_tenant_has_its_own_users(issuers):
    tokens = {
        "dev alice": issuers.token("dev", "iss-alice"),
        "second alice": issuers.token("second", "iss-alice"),  # the same sub from another issuer
        "entra A bob": issuers.token("entra", "iss-bob", tenant=TENANT_A),
        "entra B bob": issuers.token("entra", "iss-bob", tenant=TENANT_B),  # the same oid in another tenant
    }
    identities = {}
    for who, token in tokens.items():
        response = await post("token", token)
        assert response.status_code == 200, (who, response.get_body())
        identities[who] = body_of(response)["communicationUserId"]
    assert len(set(identities.values())) == 4
    for who, token in tokens.items():  # stable: each refresh finds the same identity
        assert body_of(await post("token/refresh", token))["communicationUserId"] == identities[who]
    mapped = await services().store.identities.get(
        __import__("shared.store.keys", fromlist=["user_key"]).user_key(
            issuers.entra_iss(TENANT_B), object_id_for("iss-bob")
        )
    )
    assert mapped.communication_user_id == identities["entra B bob"]  # keyed (tenant's iss, oid)


async def test_a_tenant_not_on_the_allow_list_is_refused_without_asking_anyone(issuers):
    assert (await post("token", issuers.token("entra", "iss-warm-up", tenant=TENANT_A))).status_code == 200
    before = issuers.requests_served()
    assert _refused(await post("token", issuers.token("entra", "iss-carol", tenant=TENANT_C)))
    assert issuers.requests_served() == before


async def test_an_iss_naming_one_tenant_with_another_tid_is_refused(issuers):
    token = issuers.token("entra", "iss-mallory", tenant=TENANT_A, tid=TENANT_B)
    response = await post("token", token)
    assert _refused(response) and "tid" in body_of(response)["detail"]


async def test_one_issuers_key_never_validates_another_issuers_token(issuers):
    for issuer, key in (("dev", "second"), ("second", "dev"), ("second", "entra"), ("entra", "dev")):
        assert (
            await post("token", issuers.token(key, "iss-warm-" + key))
        ).status_code == 200  # the key is known
        forged = issuers.token(issuer, f"iss-forged-{issuer}-{key}", key=key)
        assert _refused(await post("token", forged)), (issuer, key)


async def test_an_unknown_issuer_makes_no_discovery_request(issuers):
    before = issuers.requests_served()
    for iss in (
        issuers.stack["issuer"] + "/evil",  # on the dev issuer's own server: it would be counted
        issuers.entra_iss(str(uuid.uuid4())),
        "http://169.254.169.254/metadata",  # the classic SSRF target
    ):
        token = issuers.token("dev", "iss-ssrf", iss=iss)
        response = await post("token", token)
        assert _refused(response) and "does not trust" in body_of(response)["detail"], iss
    assert issuers.requests_served() == before


async def test_each_issuers_policy_applies_to_its_users(issuers):
    second, dev = issuers.token("second", "iss-pat"), issuers.token("dev", "iss-pat")
    voip = await post("token", second, {"scopes": ["voip"]})
    assert voip.status_code == 400 and body_of(voip)["code"] == "scope_not_allowed"
    long = await post("token", second, {"expiresInMinutes": 240})
    assert long.status_code == 400 and body_of(long)["code"] == "invalid_expiry"
    default = body_of(await post("token", second))
    assert default["scopes"] == ["chat"]  # the service's default scopes, within the issuer's
    assert (await post("token", dev, {"scopes": ["voip"], "expiresInMinutes": 240})).status_code == 200

    async def retention(token: str) -> int:
        return (
            await function_app.manage_retention(request("GET", "manage/retention", token=token))
        ).status_code

    assert await retention(issuers.token("second", "iss-boss", roles=("TokenService.Admin",))) == 403
    assert await retention(issuers.token("second", "iss-boss", roles=("Second.Admin",))) == 200
    assert await retention(issuers.token("dev", "iss-boss", roles=("Second.Admin",))) == 403
    assert await retention(issuers.token("dev", "iss-boss", roles=("TokenService.Admin",))) == 200
    # A customer tenant's own admins assign its app roles: none of them is an admin here.
    for tenant in (TENANT_A, TENANT_B):
        assert (
            await retention(issuers.token("entra", "iss-boss", tenant=tenant, roles=("TokenService.Admin",)))
            == 403
        )


async def test_graph_events_find_users_of_every_tenant(issuers, emulator):
    """A Graph event names (tenant, object id): it reaches that tenant's user and no other's."""
    issued = {}
    for tenant in (TENANT_A, TENANT_B):
        response = await post("token", issuers.token("entra", "iss-gina", tenant=tenant))
        assert response.status_code == 200, response.get_body()
        issued[tenant] = body_of(response)
    event = graph_user_event("UserDeleted", TENANT_B, object_id_for("iss-gina"))
    delivered = await deliver(event)
    assert delivered.status_code == 200, delivered.get_body()
    assert not emulator.verify(issued[TENANT_B]["token"])["valid"]
    assert emulator.verify(issued[TENANT_A]["token"])["valid"]


async def test_an_entry_may_name_its_discovery_document(stack, emulator, monkeypatch):
    """B2C and the like publish it under another path than the issuer's (`metadata`)."""
    second = stack["issuers"]["second"]
    entries = [
        {
            "issuer": second,
            "audiences": stack["audience"],
            "metadata": f"{second}/.well-known/openid-configuration",
        }
    ]
    await configure(monkeypatch, stack, managed_identity=False)
    await trust_only(monkeypatch, entries)
    try:
        response = await post("token", Issuers(stack).token("second", "iss-metadata"))
        assert response.status_code == 200, response.get_body()
    finally:
        await reset_services()
        reset_settings()


async def test_oid_keyed_users_made_under_auth_issuer_are_found_by_graph_events_after_the_switch(
    stack, emulator, monkeypatch
):
    """AUTH_ISSUER with AUTH_USER_CLAIM=oid files no Graph lookup rows; after moving to AUTH_ISSUERS
    (the same issuer, userClaim oid) a Graph event still finds those users, by their key."""
    await configure(monkeypatch, stack, managed_identity=False, AUTH_USER_CLAIM="oid")
    users = Issuers(stack)
    issued = body_of(await post("token", users.token("dev", "iss-switched")))
    entries = [{"issuer": stack["issuers"]["dev"], "audiences": stack["audience"], "userClaim": "oid"}]
    await trust_only(monkeypatch, entries)
    try:
        event = graph_user_event("UserDeleted", stack["tenant_id"], object_id_for("iss-switched"))
        delivered = await deliver(event)
        assert delivered.status_code == 200, delivered.get_body()
        assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    finally:
        await reset_services()
        reset_settings()


def test_the_local_stack_trusts_its_three_issuers_with_the_example_value(stack):
    """`make env KEY=auth_issuers_example` in local.settings.json's AUTH_ISSUERS: the stack then sets
    no AUTH_ISSUER of its own (devstack/service_settings.py), and the service trusts all three."""
    from devstack.service_settings import settings_for_host

    local = {"Values": {"AUTH_ISSUERS": stack["auth_issuers_example"], "AUTH_USER_CLAIM": "sub"}}
    values = settings_for_host(stack.env, managed_identity=False, local_settings=local)
    assert not {single.name for single in SINGLE_ISSUER} & set(values)
    trusted = load(values).trusted_issuers
    assert [t.issuer for t in trusted] == [stack["issuers"][name] for name in ("dev", "entra", "second")]
    assert trusted[1].tenants == {TENANT_A, TENANT_B} and trusted[0].admin_role == "TokenService.Admin"
