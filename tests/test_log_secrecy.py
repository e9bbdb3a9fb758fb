"""No ACS token, user JWT, access key or connection string in any log record, even at DEBUG."""

from __future__ import annotations

import inspect
import json
import logging

import azure.functions as func

import function_app
from shared.clients import get_clients
from tests.service_helpers import body_of, request

ADMIN = ("TokenService.Admin",)


def _secrets_of(stack) -> set[str]:
    conn = stack["acs_connection_string"]
    tables = stack["tables_connection_string"]
    account_key = tables.split("AccountKey=")[1].split(";")[0]
    return {conn, conn.split("accesskey=")[1], tables, account_key, stack["identity_header"]}


async def test_every_route_at_debug_logs_no_secret(service, emulator, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("azure", "azure.core.pipeline.policies.http_logging_policy", "aiohttp", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    secrets = _secrets_of(service.stack)

    def user(name: str, roles=()) -> str:
        token = service.token(name, roles=roles)
        secrets.add(token)
        return token

    async def call(handler, method: str, route: str, token: str | None, **kwargs) -> func.HttpResponse:
        response = handler(request(method, route, token=token, **kwargs))
        if inspect.isawaitable(response):
            response = await response
        body = response.get_body()
        if body.startswith(b"{"):
            value = json.loads(body).get("token")
            if value:
                secrets.add(value)
        return response

    alice = user("log-alice")
    issued = body_of(await call(function_app.issue_token, "POST", "token", alice, body={"scopes": ["chat"]}))
    await call(function_app.refresh_token, "POST", "token/refresh", alice)
    await call(function_app.get_identity, "GET", "identity", alice)
    await call(function_app.issue_token, "POST", "token", alice, raw=b"{bad json")
    await call(function_app.issue_token, "POST", "token", alice + "tampered")
    await call(function_app.revoke_tokens, "POST", "token/revoke", alice)
    admin = user("log-admin", ADMIN)
    params = {"communicationUserId": issued["communicationUserId"]}
    await call(function_app.admin_revoke_tokens, "POST", "admin", admin, route_params=params)
    emulator.faults(down=True)
    await call(function_app.revoke_tokens, "POST", "token/revoke", alice)  # pending path
    emulator.faults(down=False)
    await get_clients().cleanup.run(ignore_backoff=True)
    await call(function_app.admin_delete_identity, "DELETE", "admin", admin, route_params=params)
    bob = user("log-bob")
    await call(function_app.issue_token, "POST", "token", bob)
    await call(function_app.delete_identity, "DELETE", "identity", bob)
    await call(function_app.health, "GET", "health", None)
    await call(function_app.openapi_document, "GET", "openapi.json", None)
    event = [
        {
            "id": "log-evt",
            "subject": "s",
            "eventType": "MyApp.Other",
            "eventTime": "2026-11-25T00:00:00Z",
            "dataVersion": "1",
            "data": {},
        }
    ]
    await call(
        function_app.events, "POST", "events", None, body=event, headers={"Content-Type": "application/json"}
    )

    assert len(caplog.records) > 20  # the SDKs really logged at DEBUG
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in secrets:
            assert secret not in text, f"{record.name} logged a secret through {record.msg!r}"


def test_dev_host_log_has_no_secret(stack, emulator):
    import requests

    token = stack.token("log-http").strip()
    response = requests.post(
        f"{stack['api']}/token?code=not-a-key", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert response.status_code == 200
    log = (stack.state_dir / "host.log").read_text()
    for secret in (token, response.json()["token"], stack["function_key"], *_secrets_of(stack)):
        assert secret not in log
