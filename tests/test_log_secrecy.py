"""No ACS token, user JWT, access key or connection string in any log record, even at DEBUG; and at
INFO, the level the Functions worker logs at in Azure, no ACS identity id either."""

from __future__ import annotations

import inspect
import json
import logging
import time
import uuid
from urllib.parse import quote

import azure.functions as func
import pytest

import function_app
from devstack.acs_state import TEAMS_AUDIENCE
from devstack.layout import HOST_LOG_FILE
from shared.compose import SDK_LOGGERS, reset_services, services
from shared.settings import reset_settings
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, request

ADMIN = ("TokenService.Admin",)
USER_DELETED = "LogTest.UserDeleted"
CREDENTIALS_CHANGED = "LogTest.CredentialsChanged"


def _secrets_of(stack) -> set[str]:
    conn = stack["acs_connection_string"]
    tables = stack["tables_connection_string"]
    account_key = tables.split("AccountKey=")[1].split(";")[0]
    return {conn, conn.split("accesskey=")[1], tables, account_key, stack["identity_header"]}


def _is_azure(name: str) -> bool:
    return name.startswith("azure")


@pytest.fixture
def logger_levels():
    """Every `azure*` logger back to NOTSET (earlier tests may have set some); every level put back after."""
    loggers = logging.Logger.manager.loggerDict

    def watched() -> dict[str, logging.Logger]:
        return {
            name: logger
            for name, logger in list(loggers.items())
            if isinstance(logger, logging.Logger) and (_is_azure(name) or name in ("aiohttp", "urllib3"))
        }

    saved = {name: logger.level for name, logger in watched().items()}
    for name, logger in watched().items():
        if _is_azure(name):
            logger.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for name, logger in watched().items():
            logger.setLevel(saved.get(name, logging.NOTSET))


class Routes:
    """Calls every route's handler the way the worker does, and remembers what must not be logged."""

    def __init__(self, users: Users, emulator, prefix: str) -> None:
        self.users = users
        self.emulator = emulator
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.secrets = _secrets_of(users.stack)  # tokens, JWTs, keys, connection strings
        self.acs_ids: set[str] = set()
        self.subjects: set[str] = set()
        self.statuses: dict[str, int] = {}

    def user(self, name: str, roles=(), **overrides) -> str:
        subject = f"{self.prefix}-{name}"
        self.subjects.add(subject)
        token = self.users.token(subject, roles=roles, **overrides)
        self.secrets.add(token)
        return token

    async def call(self, label: str, handler, method: str, route: str, token: str | None, **kwargs):
        response = handler(request(method, route, token=token, **kwargs))
        if inspect.isawaitable(response):
            response = await response
        self.statuses[label] = response.status_code
        body = response.get_body()
        if body.startswith(b"{"):
            answer = json.loads(body)
            if answer.get("token"):
                self.secrets.add(answer["token"])
            if answer.get("communicationUserId"):
                self.acs_ids.add(answer["communicationUserId"])
        return response

    async def issue(self, name: str) -> dict:
        response = await self.call(
            f"issue {name}", function_app.issue_token, "POST", "token", self.user(name)
        )
        return body_of(response)

    async def run(self) -> None:
        alice = self.user("alice")
        token = function_app.issue_token
        issued = body_of(await self.call("issue", token, "POST", "token", alice, body={"scopes": ["chat"]}))
        await self.call("refresh", function_app.refresh_token, "POST", "token/refresh", alice)
        await self.call("get identity", function_app.get_identity, "GET", "identity", alice)
        await self.call("bad json", token, "POST", "token", alice, raw=b"{bad json")
        await self.call("tampered bearer", token, "POST", "token", alice + "tampered")
        await self.call("revoke", function_app.revoke_tokens, "POST", "token/revoke", alice)

        admin = self.user("admin", ADMIN)
        acs_id = issued["communicationUserId"]
        params = {"communicationUserId": acs_id}
        path = f"manage/identities/{quote(acs_id, safe='')}"
        await self.call(
            "manage revoke",
            function_app.manage_revoke_tokens,
            "POST",
            f"{path}/revoke",
            admin,
            route_params=params,
        )
        self.emulator.faults(down=True)
        try:
            await self.call("revoke pending", function_app.revoke_tokens, "POST", "token/revoke", alice)
        finally:
            self.emulator.faults(down=False)
        await function_app.cleanup(func.TimerRequest())  # the timer as the host fires it
        await services().cleanup.run(ignore_backoff=True)  # and once more, to finish the pending work
        await self.call(
            "manage delete", function_app.manage_delete_identity, "DELETE", path, admin, route_params=params
        )

        bob = self.user("bob")
        await self.call("issue bob", token, "POST", "token", bob)
        await self.call("delete identity", function_app.delete_identity, "DELETE", "identity", bob)

        carol, dave = await self.issue("carol"), await self.issue("dave")
        events = [
            {
                "id": f"{self.prefix}-{n}",
                "subject": "s",
                "eventType": event_type,
                "eventTime": "2026-11-25T00:00:00Z",
                "dataVersion": "1",
                "data": data,
            }
            for n, (event_type, data) in enumerate(
                [
                    (CREDENTIALS_CHANGED, {"communicationUserId": carol["communicationUserId"]}),
                    (USER_DELETED, {"issuer": self.users.stack["issuer"], "subject": f"{self.prefix}-dave"}),
                    ("LogTest.Other", {}),
                ]
            )
        ]
        headers = {"Content-Type": "application/json", "aeg-event-type": "Notification"}
        await self.call("events", function_app.events, "POST", "events", None, body=events, headers=headers)
        assert dave["identityCreated"]

        erin = self.user("erin")
        teams = self.user("erin", audience=TEAMS_AUDIENCE, app_id=self.users.stack["teams_app_id"])
        await self.call(
            "teams token",
            function_app.teams_token,
            "POST",
            "teams/token",
            erin,
            body={"teamsAccessToken": teams},
        )
        await self.call("health", function_app.health, "GET", "health", None)
        await self.call("openapi", function_app.openapi_document, "GET", "openapi.json", None)
        await self.call("demo", function_app.demo, "GET", "demo", None)

    def check_statuses(self) -> None:
        """The flow really went where the test means it to: every ACS and Table path was taken."""
        expected = {
            "issue": 200,
            "refresh": 200,
            "get identity": 200,
            "bad json": 400,
            "tampered bearer": 401,
            "revoke": 200,
            "manage revoke": 200,
            "revoke pending": 202,
            "manage delete": 200,
            "delete identity": 200,
            "events": 200,
            "teams token": 200,
            "health": 200,
            "openapi": 200,
            "demo": 200,
        }
        assert {label: self.statuses[label] for label in expected} == expected


def _text(record: logging.LogRecord) -> str:
    return record.getMessage() + (record.exc_text or "") + (record.stack_info or "")


@pytest.fixture(params=[False, True], ids=["keys", "managed-identity"])
async def info_service(request, stack, emulator, monkeypatch):
    """The service on the stack, with custom event types, by keys or (as in Azure) managed identity."""
    await configure(
        monkeypatch,
        stack,
        managed_identity=request.param,
        EVENTS_USER_DELETED_TYPES=USER_DELETED,
        EVENTS_CREDENTIALS_CHANGED_TYPES=CREDENTIALS_CHANGED,
    )
    yield Users(stack)
    await reset_services()
    reset_settings()


async def test_every_route_at_info_logs_no_secret_and_no_acs_id(
    info_service, emulator, caplog, logger_levels
):
    """As in Azure: the root logger at INFO, and no level set on any `azure*` logger by the test.

    The Functions worker sends every record of an invocation at INFO and above to Application
    Insights; the service itself must keep the Azure SDK's request logging (URLs with ACS ids) out.
    """
    caplog.set_level(logging.INFO)
    routes = Routes(info_service, emulator, "info")
    await routes.run()
    routes.check_statuses()

    forbidden = set(routes.secrets) | routes.subjects
    for acs_id in routes.acs_ids:
        # Raw and percent-encoded (any case), and the part after "8:acs:", whatever its prefix became.
        forbidden |= {acs_id, quote(acs_id, safe=""), quote(acs_id), acs_id.split(":", 2)[2]}
    assert len(routes.acs_ids) == 4 and all(i.startswith("8:acs:") for i in routes.acs_ids)
    assert any(r.name.startswith("acs_token_service") for r in caplog.records)  # INFO records were captured
    for record in caplog.records:
        assert record.levelno >= logging.INFO
        text = _text(record).casefold()
        for value in forbidden:
            assert value.casefold() not in text, (
                f"{record.name} logged {value[:12]}... through {record.msg!r}"
            )


async def test_every_route_at_debug_logs_no_secret(service, emulator, caplog, logger_levels):
    caplog.set_level(logging.DEBUG)
    services()  # built first: building them sets the SDK loggers to WARNING, overridden here
    for name in (
        "azure",
        *SDK_LOGGERS,
        "azure.core.pipeline.policies.http_logging_policy",
        "aiohttp",
        "urllib3",
    ):
        logging.getLogger(name).setLevel(logging.DEBUG)
    routes = Routes(service, emulator, "debug")
    await routes.run()
    routes.check_statuses()

    assert len(caplog.records) > 20  # the SDKs really logged at DEBUG
    for record in caplog.records:
        text = _text(record)
        for secret in routes.secrets:
            assert secret not in text, f"{record.name} logged a secret through {record.msg!r}"


@pytest.mark.slow
def test_dev_host_log_has_no_secret_and_no_acs_id(stack, emulator):
    """Every route over HTTP through the dev host, whose worker forwards every record at INFO as
    Azure's does: host.log holds what Application Insights would get."""
    import requests

    api, log = stack["api"], stack.state_dir / HOST_LOG_FILE
    secrets = {stack["function_key"], stack["host_key"], stack["master_key"], *_secrets_of(stack)}
    ids: set[str] = set()

    def call(method: str, route: str, user: str | None = None, roles: tuple[str, ...] = (), **kwargs):
        headers = dict(kwargs.pop("headers", {}))
        if user is not None:
            bearer = stack.token(user, *[f"--role={r}" for r in roles]).strip()
            secrets.add(bearer)
            headers["Authorization"] = f"Bearer {bearer}"
        response = requests.request(method, f"{api}/{route}", headers=headers, timeout=60, **kwargs)
        assert response.status_code < 500, (route, response.status_code, response.text[:200])
        if response.headers.get("Content-Type", "").startswith("application/json"):
            body = response.json()
            secrets.update(v for k, v in body.items() if k == "token" and v)
            ids.update(v for k, v in body.items() if k == "communicationUserId" and v)
        return response

    marker = uuid.uuid4().hex[:8]
    alice, admin = f"log-http-{marker}", f"log-http-admin-{marker}"
    issued = call("POST", "token", alice, json={"scopes": ["chat"]}).json()
    call("POST", "token/refresh", alice)
    call("GET", "identity", alice)
    call("POST", "token", alice, data=b"{bad json", headers={"Content-Type": "application/json"})
    call("POST", "token/revoke", alice)
    user_id = issued["communicationUserId"]
    call("POST", f"manage/identities/{quote(user_id, safe='')}/revoke", admin, roles=ADMIN)
    emulator.faults(down=True)
    call("POST", "token/revoke", alice)  # pending
    emulator.faults(down=False)
    call("DELETE", f"manage/identities/{quote(user_id, safe='')}", admin, roles=ADMIN)
    bob = f"log-http-bob-{marker}"
    call("POST", "token", bob)
    call("DELETE", "identity", bob)
    call("GET", "health")
    call("GET", "openapi.json")
    event = [
        {
            "id": f"log-{marker}",
            "subject": "s",
            "eventType": "MyApp.Other",
            "eventTime": "2026-11-25T00:00:00Z",
            "dataVersion": "1",
            "data": {},
        }
    ]
    call("POST", "events", json=event, headers={"x-functions-key": stack["function_key"]})
    run_now = f"{api.removesuffix('/api')}/admin/functions/cleanup"
    assert (
        requests.post(
            run_now, json={}, headers={"x-functions-key": stack["master_key"]}, timeout=10
        ).status_code
        == 202
    )

    deadline = time.monotonic() + 30
    while "Executed 'Functions.cleanup'" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = log.read_text()
    assert "Function.issue_token.User" in logged  # the service's own records came through the worker
    assert ids, "no identity was issued"
    for secret in secrets:
        assert secret not in logged
    for acs_id in ids:
        for form in (
            acs_id,
            quote(acs_id, safe=""),
            quote(acs_id, safe="").lower(),
            acs_id.split(":", 2)[-1],
        ):
            assert form not in logged, f"an ACS identity id reached host.log ({form[:12]}...)"
