"""Nothing per request that can be per worker: keys, SDK clients and credentials are made once.

100 requests, many at once, through the registered handlers (as the worker calls them) with
managed identity, so that every per-worker object exists: the JWKS document is fetched once, each
SDK client and the credential are constructed once, the credential is asked for a token once per
audience (Table Storage, ACS), and a bearer token is verified once, however often it is presented
(until it expires or the keys are refetched). And importing function_app loads none of the SDKs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import aiohttp
import azure.communication.identity.aio as acs_aio
import azure.data.tables.aio as tables_aio
import azure.identity.aio as identity_aio
import pytest

import function_app
from shared.auth import JwksCache
from shared.compose import services
from tests.conftest import REPO_ROOT
from tests.service_helpers import body_of, request

REQUESTS = 100


def _count_calls(
    monkeypatch: pytest.MonkeyPatch, counts: Counter, owner: type, name: str, label: str
) -> None:
    original = getattr(owner, name)

    if asyncio.iscoroutinefunction(original):

        async def counted(*args, **kwargs):
            counts[label] += 1
            return await original(*args, **kwargs)

    else:

        def counted(*args, **kwargs):
            counts[label] += 1
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counts: Counter = Counter()
    _count_calls(monkeypatch, counts, acs_aio.CommunicationIdentityClient, "__init__", "ACS client")
    _count_calls(monkeypatch, counts, tables_aio.TableClient, "__init__", "Table client")
    _count_calls(monkeypatch, counts, identity_aio.DefaultAzureCredential, "__init__", "credential")
    _count_calls(monkeypatch, counts, aiohttp.ClientSession, "__init__", "aiohttp session")
    for method in ("get_token", "get_token_info"):
        if hasattr(identity_aio.DefaultAzureCredential, method):
            _count_calls(monkeypatch, counts, identity_aio.DefaultAzureCredential, method, "credential token")
    original_get_json = JwksCache._get_json

    async def fetch(self, url: str) -> dict:
        counts["GET " + ("discovery" if url.endswith("openid-configuration") else "JWKS")] += 1
        return await original_get_json(self, url)

    monkeypatch.setattr(JwksCache, "_get_json", fetch)
    return counts


async def test_jwks_clients_and_credential_are_made_once_across_100_requests(keyless_service, counts):
    users = keyless_service
    names = [f"per-worker-{i % 10}" for i in range(REQUESTS)]
    tokens = {name: users.token(name) for name in set(names)}
    for name in set(names):  # their identities exist: the 100 requests below mix every route
        assert (
            await function_app.issue_token(request("POST", "token", token=tokens[name]))
        ).status_code == 200
    assert services().jwks.fetches == 1
    first = Counter(counts)

    routes = [
        (function_app.issue_token, "POST", "token"),
        (function_app.refresh_token, "POST", "token/refresh"),
        (function_app.get_identity, "GET", "identity"),
    ]
    gate = asyncio.Semaphore(20)

    async def call(i: int) -> int:
        handler, method, route = routes[i % len(routes)]
        async with gate:
            response = await handler(request(method, route, token=tokens[names[i]]))
        return response.status_code

    assert set(await asyncio.gather(*(call(i) for i in range(REQUESTS)))) == {200}

    assert counts == first, "no per-worker object was made again, and no key or token fetched again"
    assert counts["GET discovery"] == 1 and counts["GET JWKS"] == 1
    assert services().jwks.fetches == 1
    assert counts["ACS client"] == 1 and counts["Table client"] == 1 and counts["credential"] == 1
    assert counts["credential token"] <= 2  # one per audience: Table Storage and ACS
    assert services().authenticator.verifications == len(tokens)  # once per distinct bearer
    # One session for the JWKS, one per SDK client's transport, the credential's own: fixed.
    assert counts["aiohttp session"] <= 4


async def test_concurrent_first_requests_of_a_worker_fetch_the_keys_once(keyless_service, counts):
    users = keyless_service
    token = users.token("per-worker-cold")
    responses = await asyncio.gather(
        *(function_app.refresh_token(request("POST", "token/refresh", token=token)) for _ in range(20))
    )
    assert {r.status_code for r in responses} == {404}  # authenticated (no identity yet), not 401/503
    assert counts["GET JWKS"] == 1 and counts["ACS client"] == 1 and counts["Table client"] == 1


def test_importing_function_app_loads_no_sdk():
    """The host indexes function_app first: the SDKs load with the clients, on the first request."""
    sdks = (
        "aiohttp",
        "azure.core",
        "azure.data.tables",
        "azure.communication.identity",
        "azure.identity",
        "jwt",
    )
    code = f"import sys, function_app; print(','.join(m for m in {sdks!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"imported at index time: {out.stdout.strip()}"


async def test_a_token_presented_again_is_not_verified_again(service):
    token = service.token("per-worker-again")
    for _ in range(20):
        response = await function_app.refresh_token(request("POST", "token/refresh", token=token))
        assert response.status_code == 404  # authenticated; no identity yet
    assert services().authenticator.verifications == 1


async def test_a_remembered_token_still_expires(service):
    from shared.auth.jwt import LEEWAY_SECONDS

    claims = service.base_claims("per-worker-expiring")
    claims["exp"] = int(time.time()) - LEEWAY_SECONDS + 2  # accepted for one or two more seconds
    token = service.claims_token(claims)
    assert (
        await function_app.refresh_token(request("POST", "token/refresh", token=token))
    ).status_code == 404
    await asyncio.sleep(2.2)
    response = await function_app.refresh_token(request("POST", "token/refresh", token=token))
    assert response.status_code == 401 and body_of(response)["detail"] == "The token has expired."


async def test_a_remembered_token_is_verified_again_once_the_keys_are_refetched(service):
    from shared.auth.jwks import KEYS_TTL_SECONDS

    token = service.token("per-worker-rotation")
    for _ in range(3):
        await function_app.refresh_token(request("POST", "token/refresh", token=token))
    clients = services()
    assert (clients.jwks.fetches, clients.authenticator.verifications) == (1, 1)
    real_clock = clients.jwks.clock
    clients.jwks.clock = lambda: real_clock() + KEYS_TTL_SECONDS  # an hour on: due for its refetch
    assert (
        await function_app.refresh_token(request("POST", "token/refresh", token=token))
    ).status_code == 404
    await clients.jwks.settled()  # the stale set served that request; its refresh runs in the background
    assert (clients.jwks.fetches, clients.authenticator.verifications) == (2, 2)
