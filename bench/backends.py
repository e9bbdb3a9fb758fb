"""The three ways a benchmark reaches ACS and Table Storage.

- `Floor`: the backend calls a request cannot avoid, made directly with the aio SDKs: a refresh is
  one Table point read and one ACS issueAccessToken; a first issue is one read (a miss), one ACS
  create-and-issue and one insert.
- `HandlerLevel`: the function app's registered handlers, called in this process directly (an
  `HttpRequest` in, awaited on the loop, many at once): the service alone.
- `WorkerLevel`: the same functions through Azure's Python worker runtime (azure-functions-runtime)
  in this process: an InvocationRequest in, an InvocationResponse out, as the dev host's worker
  process handles each call, without the stream between host and worker. Against `HandlerLevel`
  it is the worker layer's own cost.
- `EndToEnd`: HTTP through the dev host and its worker process, as clients reach the service.

All three use the same stack and the same kind of credential (managed identity through the
stack's App Service-style endpoint), so the only difference between them is the service.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager

import aiohttp
import azure.functions as func
from azure.communication.identity import CommunicationUserIdentifier
from azure.communication.identity.aio import CommunicationIdentityClient
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient
from azure.identity.aio import ManagedIdentityCredential

from devstack.service_settings import settings_for_host
from shared.settings import IDENTITY_TABLE, SETTING_NAMES, TOKEN_DEFAULT_MINUTES, TOKEN_DEFAULT_SCOPES

SCOPES = list(TOKEN_DEFAULT_SCOPES.default)  # the service's defaults, asked for by an empty body
MINUTES = TOKEN_DEFAULT_MINUTES.default
TABLE = IDENTITY_TABLE.default
# Every app setting, and the managed-identity variables the stack's settings might leave stale.
SERVICE_SETTINGS = (*SETTING_NAMES, "MSI_ENDPOINT", "MSI_SECRET")


# The bench compares the service's path to ACS with the floor: a refresh answered again from a
# worker's fresh tokens (STORM_PROTECTION, shared/storm.py) makes no ACS call, so these
# measurements switch that off; bench/storm.py measures it, on and off.
MEASURED = {"STORM_PROTECTION": "off"}


@contextmanager
def service_environment(env: dict, **overrides: str):
    """The app settings the dev host gets (managed identity, no keys), restored on exit."""
    values = settings_for_host(env, managed_identity=True) | MEASURED | overrides
    values = {k: v for k, v in values.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    names = set(values) | set(SERVICE_SETTINGS)
    saved = {name: os.environ.get(name) for name in names}
    for name in SERVICE_SETTINGS:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Floor:
    """The unavoidable calls, made directly with the aio SDKs (inside `service_environment`)."""

    def __init__(self, env: dict) -> None:
        self.env = env

    async def __aenter__(self) -> Floor:
        # The service's own client options (timeouts, retries, transport), so that the ratio
        # service / floor measures what the service does around the calls, not how it calls.
        from shared.compose import ACS_CLIENT_OPTIONS, TABLE_CLIENT_OPTIONS, transport_options

        self.credential = ManagedIdentityCredential()
        self.table = TableClient(
            self.env["tables_endpoint"],
            TABLE,
            credential=self.credential,
            **TABLE_CLIENT_OPTIONS,
            **transport_options(),
        )
        self.acs = CommunicationIdentityClient(
            self.env["acs_endpoint"], self.credential, **ACS_CLIENT_OPTIONS, **transport_options()
        )
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.acs.close()
        await self.table.close()
        await self.credential.close()

    async def refresh(self, user_key: str, communication_user_id: str) -> None:
        await self.table.get_entity(user_key, "identity")
        await self.acs.get_token(
            CommunicationUserIdentifier(communication_user_id),
            SCOPES,
            token_expires_in=dt.timedelta(minutes=MINUTES),
        )

    async def first_issue(self, user_key: str, issuer: str, subject: str) -> None:
        try:
            await self.table.get_entity(user_key, "identity")
            raise RuntimeError("a floor first issue found an existing row")
        except ResourceNotFoundError:
            pass
        user, _token = await self.acs.create_user_and_token(
            SCOPES, token_expires_in=dt.timedelta(minutes=MINUTES)
        )
        now = dt.datetime.now(dt.UTC)
        await self.table.create_entity(
            {
                "PartitionKey": user_key,
                "RowKey": "identity",
                "communicationUserId": user.properties["id"],
                "issuer": issuer,
                "subject": subject,
                "createdAt": now,
                "lastUsedOn": now.date().isoformat(),
                "lastIssuedAt": now,
                "pending": "",
                "pendingId": "",
            }
        )


def _registered() -> dict:
    """function_app's functions by name (get_functions() refuses names it has seen: reset first)."""
    import function_app

    function_app.app.functions_bindings = None
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


class HandlerLevel:
    """function_app's registered HTTP functions, in this process (inside `service_environment`)."""

    async def __aenter__(self) -> HandlerLevel:
        from shared.compose import reset_services
        from shared.settings import reset_settings

        reset_settings()
        await reset_services()
        self.functions = _registered()
        self.calls = 0
        return self

    async def __aexit__(self, *_exc) -> None:
        from shared.compose import reset_services
        from shared.settings import reset_settings

        await reset_services()
        reset_settings()

    async def call(self, name: str, token: str, body: bytes = b"", method: str = "POST") -> func.HttpResponse:
        function = self.functions[name]
        trigger = function.get_trigger()
        request = func.HttpRequest(
            method=method,
            url=f"http://localhost/api/{trigger.route}",
            headers={"Authorization": f"Bearer {token}"},
            params={},
            route_params={},
            body=body,
        )
        self.calls += 1
        response = await function.get_user_function()(**{trigger.name: request})
        if response.status_code != 200:
            raise RuntimeError(f"{name} answered {response.status_code}: {response.get_body()[:200]!r}")
        return response  # not parsed here: the worker hands the body on as it is


class WorkerLevel:
    """function_app's functions through azure-functions-runtime in this process (see the module doc)."""

    async def __aenter__(self) -> WorkerLevel:
        import azure_functions_runtime as runtime

        from devstack.rpc import protos
        from devstack.service_settings import REPO_ROOT
        from devstack.worker import WorkerRequest
        from shared.compose import reset_services
        from shared.settings import reset_settings

        reset_settings()
        await reset_services()
        import function_app

        function_app.app.functions_bindings = None  # get_functions() refuses names it has seen
        self.runtime, self.protos, self.request = runtime, protos, WorkerRequest
        runtime.start_threadpool_executor()
        init = protos.StreamingMessage(
            worker_init_request=protos.WorkerInitRequest(function_app_directory=str(REPO_ROOT))
        )
        answer = await runtime.worker_init_request(
            WorkerRequest("WorkerInitRequest", init, {"protos": protos, "host": "127.0.0.1"})
        )
        if answer.result.status != protos.StatusResult.Success:
            raise RuntimeError(
                f"the worker runtime could not index function_app: {answer.result.exception.message}"
            )
        listed = await runtime.functions_metadata_request(WorkerRequest("WorkerMetadataRequest", None))
        self.function_ids = {m.name: m.function_id for m in listed.function_metadata_results}
        self.calls = 0
        return self

    async def __aexit__(self, *_exc) -> None:
        from shared.compose import reset_services
        from shared.settings import reset_settings

        self.runtime.stop_threadpool_executor()
        await reset_services()
        reset_settings()

    async def call(self, name: str, token: str, body: bytes = b"", method: str = "POST") -> bytes:
        protos = self.protos
        http = protos.RpcHttp(
            method=method, url="http://localhost/api/", headers={"authorization": f"Bearer {token}"}
        )
        if body:
            http.body.bytes = body
        self.calls += 1
        message = protos.StreamingMessage(
            invocation_request=protos.InvocationRequest(
                invocation_id=str(self.calls),
                function_id=self.function_ids[name],
                input_data=[protos.ParameterBinding(name="req", data=protos.TypedData(http=http))],
            )
        )
        answer = await self.runtime.invocation_request(self.request("FunctionInvocationRequest", message))
        status = answer.return_value.http.status_code
        if answer.result.status != protos.StatusResult.Success or status != "200":
            raise RuntimeError(f"{name} answered {status or answer.result.exception.message[:200]}")
        return answer.return_value.http.body.bytes


class EndToEnd:
    """HTTP to the stack's dev host, over keep-alive connections, one per concurrent caller."""

    def __init__(self, api: str, connections: int) -> None:
        self.api = api.rstrip("/")
        self.connections = connections

    async def __aenter__(self) -> EndToEnd:
        connector = aiohttp.TCPConnector(limit=self.connections)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.session.close()

    async def call(self, route: str, token: str) -> bytes:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.post(f"{self.api}/{route}", headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{route} answered {response.status}: {body[:200]!r}")
            return body
