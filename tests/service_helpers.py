"""Calling the service's handlers the way the Functions worker does, with real user tokens."""

from __future__ import annotations

import json
import time

import azure.functions as func
import jwt

from devstack.issuer import mint_user_token
from devstack.layout import HOST_LOG_FILE, ISSUER_KEY_FILE
from devstack.signing import SigningKey


class Users:
    """Mints user JWTs from the running stack's dev issuer (and forgeries of them)."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.key = SigningKey.load(stack.state_dir / ISSUER_KEY_FILE)

    def token(self, user: str, *, roles: tuple[str, ...] = (), **overrides) -> str:
        args = {
            "key": self.key,
            "issuer": self.stack["issuer"],
            "audience": self.stack["audience"],
            "user": user,
            "roles": roles,
            "tenant_id": self.stack["tenant_id"],
        }
        args.update(overrides)
        return mint_user_token(**args)

    def claims_token(
        self, claims: dict, *, key: SigningKey | None = None, headers: dict | None = None
    ) -> str:
        key = key or self.key
        return jwt.encode(
            claims, key.private_key, algorithm="RS256", headers={"kid": self.key.kid, **(headers or {})}
        )

    def base_claims(self, user: str = "mallory") -> dict:
        now = int(time.time())
        return {
            "iss": self.stack["issuer"],
            "aud": self.stack["audience"],
            "sub": user,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        }


def request(
    method: str,
    route: str,
    *,
    token: str | None = None,
    body: object = None,
    raw: bytes | None = None,
    headers: dict | None = None,
    route_params: dict | None = None,
    params: dict | None = None,
) -> func.HttpRequest:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if raw is None:
        raw = b"" if body is None else json.dumps(body).encode()
    return func.HttpRequest(
        method=method,
        url=f"http://localhost/api/{route}",
        headers=all_headers,
        params=params or {},
        route_params=route_params or {},
        body=raw,
    )


async def post(route: str, bearer: str, body: dict | None = None) -> func.HttpResponse:
    """POST one of a user's own token routes with `bearer`, through function_app's handler."""
    import function_app

    handler = {
        "token": function_app.issue_token,
        "token/refresh": function_app.refresh_token,
        "token/revoke": function_app.revoke_tokens,
    }[route]
    return await handler(request("POST", route, token=bearer, body=body))


async def post_as(users: Users, route: str, user: str, body: dict | None = None) -> func.HttpResponse:
    """`post` as `user` would, with a bearer the dev issuer minted."""
    return await post(route, users.token(user), body)


async def deliver(body: bytes) -> func.HttpResponse:
    """One CloudEvent (e.g. `graph_user_event`'s) to the webhook, as Event Grid delivers it."""
    import function_app

    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    return await function_app.events(request("POST", "events", raw=body, headers=headers))


def graph_user_event(kind: str, tenant_id: str, object_id: str) -> bytes:
    """A Microsoft Graph user event as Event Grid delivers it (one CloudEvent), e.g. UserDeleted."""
    import uuid

    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": f"/tenants/{tenant_id}/applications/00000000-0000-0000-0000-000000000000",
            "type": f"Microsoft.Graph.{kind}",
            "subject": f"Users/{object_id}",
            "data": {
                "changeType": "deleted",
                "resource": f"Users/{object_id}",
                "resourceData": {"id": object_id, "organizationId": tenant_id},
            },
        }
    ).encode()


def body_of(response: func.HttpResponse) -> dict:
    return json.loads(response.get_body())


async def retention_rows(table, user_key: str) -> list:
    """The index's retention rows filed for this user, under any day."""
    from shared.store import keys

    query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi and userKey eq @k"
    params = {"p": keys.INDEX_PARTITION, "lo": keys.RETENTION_PREFIX, "hi": "d.", "k": user_key}
    return [e async for e in table.query_entities(query, parameters=params)]


async def graph_rows(table, tenant_id: str, object_id: str) -> list:
    """The index's Graph lookup rows of one Entra user, one per app user key."""
    from shared.store import keys

    prefix = keys.graph_prefix(tenant_id, object_id)
    query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi"
    params = {"p": keys.INDEX_PARTITION, "lo": prefix, "hi": keys.prefix_end(prefix)}
    return [e async for e in table.query_entities(query, parameters=params)]


class HostLog:
    """The dev host's log from now on: what the worker logged for the requests a test makes.

    Unexpected errors reach it as an ERROR record with the stack (shared/http/problems.py), so a clean
    window shows that every answer in it was a mapped problem, not a caught crash."""

    def __init__(self, stack) -> None:
        self.path = stack.state_dir / HOST_LOG_FILE
        self.offset = self.path.stat().st_size

    def since(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode("utf-8", "replace")

    def assert_no_error(self, invocations: int) -> None:
        """Once the host has logged `invocations` finished invocations: no ERROR and no traceback."""
        deadline = time.monotonic() + 10
        while self.since().count("Executed 'Functions.") < invocations and time.monotonic() < deadline:
            time.sleep(0.05)
        logged = self.since()
        assert logged.count("Executed 'Functions.") >= invocations, logged[-2000:]
        for sign in (" ERROR ", "Traceback", 'File "'):
            assert sign not in logged, logged[-3000:]


async def retention_runs() -> dict:
    """Two cleanup runs as the timer makes them: one claims stale identities, one past the claims'
    grace commits them (shared/cleanup/, RETIRE_GRACE); their counts added up."""
    import datetime as dt
    from collections import Counter

    from shared.cleanup import RETIRE_GRACE
    from shared.compose import services

    cleanup = services().cleanup
    first = await cleanup.run(ignore_backoff=True)
    real = cleanup.clock
    cleanup.clock = lambda: real() + RETIRE_GRACE + dt.timedelta(minutes=1)
    try:
        second = await cleanup.run(ignore_backoff=True)
    finally:
        cleanup.clock = real
    return dict(Counter(first) + Counter(second))


async def drain_cleanup() -> None:
    """Let the timer finish what earlier tests left (the table is the session's), so that a run's
    counts are the calling test's alone."""
    import datetime as dt

    from shared.cleanup import MAX_BACKOFF, RETIRE_GRACE
    from shared.compose import services

    await retention_runs()
    cleanup = services().cleanup
    real = cleanup.clock
    cleanup.clock = lambda: real() + RETIRE_GRACE + MAX_BACKOFF + dt.timedelta(minutes=1)
    try:
        await cleanup.run(ignore_backoff=True)
    finally:
        cleanup.clock = real
