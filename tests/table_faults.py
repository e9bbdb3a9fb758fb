"""Table Storage writes that "commit late": a fault-injecting proxy in front of Azurite.

Real Azure can tell a client that a write failed, or tell it nothing at all, and still commit the
write: a client-side read timeout, or a 500 `OperationTimedOut` whose operation completes anyway.
The write may even land *after* the client has looked for it and found nothing. `FaultyTableProxy`
makes that deterministic against Azurite:

    fault = table_faults.arm("late", match="insert mapping", retries="fail")
    ...  # the service inserts: it gets 500 OperationTimedOut; Azurite has not seen the insert
    ...  # the service reads the row: a miss
    status = await fault.commit()  # now the insert reaches Azurite (201, or 409 if something won)

The proxy is bench.counting.TableCountingProxy (the same TLS termination with the stack's server
certificate, the same request classes, `calls` and `statuses` counters) with one-shot faults.

Fault modes (the first attempt of the first request that matches, once):

- `late`: the client gets 500 OperationTimedOut at once; the request reaches Azurite only later:
  when the test calls `await fault.commit()`, or after `delay` seconds.
- `timeout`: the client gets no answer at all until it gives up (its read timeout: the service's is
  TABLE_CLIENT_OPTIONS["read_timeout"], see `configure_service(read_timeout=...)`), until
  `fault.release()`, or until `hold` seconds have passed (then 500 OperationTimedOut). The request
  reaches Azurite before the hold (`forward="before"`, the default: it commits while the client
  waits) or later (`forward="after"`: on `commit()` or after `delay`).
- `lost_answer`: the request reaches Azurite at once (it commits), then the client gets 500
  OperationTimedOut instead of Azurite's answer.

Retries. azure-core retries a 500 on POST/PATCH (and any error on idempotent methods) with the same
`x-ms-client-request-id`: the proxy knows a retry by that id (or, without one, by the same method,
path and body) and counts attempts (`fault.attempts`, `proxy.attempts`). A fault acts on the first
attempt only. Its retries:

- `retries="forward"` (default): forwarded as any request. Beware what that does to the scenario:
  azure-core's first retry comes at once (no backoff before the second try), so a `late` insert's
  retry lands first and the client sees success (201); the late commit then gets 409
  EntityAlreadyExists (`commit()` returns 409). If the late write lands before the retry (a
  `delay` shorter than the backoff, or a commit from another task), the retry gets 409 and the
  client sees ResourceExistsError.
- `retries="fail"`: every retry gets the fault's answer (500 OperationTimedOut; for `timeout`, no
  answer) and is *not* forwarded, until `fault.release()`; later retries are forwarded. The SDK
  then gives up with HttpResponseError 500 (`retry_total` + 1 attempts), and only the first attempt
  can ever commit, when the test says so.

A POST that times out (no answer at all) is never retried by azure-core: it retries POST only on
a 500/503/504 answer. A PUT/MERGE/DELETE that times out is retried (`retry_read`).

A $batch request is faulted as a whole (a top-level 500 answer), like a point request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import pytest
from aiohttp import web
from yarl import URL

from bench.counting import TableCountingProxy, classify

Mode = Literal["late", "timeout", "lost_answer"]
Retries = Literal["forward", "fail"]

_HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_POINT = re.compile(r"\(PartitionKey='(?P<pk>[^']*)',\s*RowKey='(?P<rk>[^']*)'\)$")

# What Azure Table Storage sends for an operation that did not finish in time (HTTP 500). The
# common REST error codes list it as "The operation could not be completed within the permitted
# time."; the service itself words it as below (seen in Table and Blob answers), and, like every
# Table error in JSON, appends "\nRequestId:<id>\nTime:<UTC, 7 fractional digits>Z" to the message.
OPERATION_TIMED_OUT = "OperationTimedOut"
OPERATION_TIMED_OUT_MESSAGE = "Operation could not be completed within the specified time."
TABLE_ERROR_CONTENT_TYPE = "application/json;odata=minimalmetadata;streaming=true;charset=utf-8"


@dataclass(frozen=True)
class TableRequest:
    """One request the proxy received, as a predicate sees it."""

    method: str
    path: str  # decoded, e.g. /devstoreaccount1/acsidentities(PartitionKey='u-..',RowKey='')
    raw_path: str  # as sent, with the query string
    query: str
    headers: Mapping[str, str]
    body: bytes
    call: str  # bench.counting.classify: 'insert mapping', 'read mapping', 'batch [...]', ...
    partition_key: str | None  # from the body of an insert, else from the URL; None for the rest
    row_key: str | None
    client_request_id: str | None

    @property
    def identity(self) -> str:
        """The same for every attempt of one SDK call (azure-core keeps x-ms-client-request-id)."""
        if self.client_request_id:
            return self.client_request_id
        digest = hashlib.sha256(self.body).hexdigest()
        return f"{self.method} {self.raw_path} {digest}"

    @classmethod
    def of(cls, request: web.Request, body: bytes) -> TableRequest:
        partition_key = row_key = None
        resource = request.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "POST" and not resource.startswith(("Tables", "$batch")):
            try:
                entity = json.loads(body)
                partition_key, row_key = entity.get("PartitionKey"), entity.get("RowKey")
            except (ValueError, AttributeError):
                pass
        elif point := _POINT.search(resource):
            # OData doubles a quote inside a key: '' -> '
            partition_key = unquote(point["pk"]).replace("''", "'")
            row_key = unquote(point["rk"]).replace("''", "'")
        return cls(
            method=request.method,
            path=request.path,
            raw_path=request.raw_path,
            query=request.query_string,
            headers=request.headers,
            body=body,
            call=classify(request.method, request.path, request.headers, body, query=request.query_string),
            partition_key=partition_key,
            row_key=row_key,
            client_request_id=request.headers.get("x-ms-client-request-id"),
        )


Match = str | Callable[[TableRequest], bool]


def row(partition_key: str, row_key: str, *methods: str) -> Callable[[TableRequest], bool]:
    """A predicate: a request for this row (an insert's body, or the URL's keys), by any of
    `methods` (default: any write, i.e. POST, PUT, MERGE, PATCH, DELETE)."""
    wanted = {m.upper() for m in methods} or {"POST", "PUT", "MERGE", "PATCH", "DELETE"}

    def matches(request: TableRequest) -> bool:
        return (
            request.method in wanted and request.partition_key == partition_key and request.row_key == row_key
        )

    return matches


def table_error(
    status: int,
    code: str,
    message: str,
    request_headers: Mapping[str, str],
) -> web.Response:
    """An error answer shaped like Azure Table Storage's (JSON, as the SDK asks for).

    Headers as the service sends them: the OData JSON content type, `x-ms-error-code` (sent with
    every error since version 2017-07-29; azure-data-tables reads the code from it, then from the
    body), a new `x-ms-request-id`, the client's `x-ms-client-request-id` and `x-ms-version`
    echoed, `Date`, and the service's `Server`, `Cache-Control` and `X-Content-Type-Options`.
    """
    request_id = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    value = f"{message}\nRequestId:{request_id}\nTime:{now:%Y-%m-%dT%H:%M:%S.%f}0Z"
    body = {"odata.error": {"code": code, "message": {"lang": "en-US", "value": value}}}
    headers = {
        "Cache-Control": "no-cache",
        "Content-Type": TABLE_ERROR_CONTENT_TYPE,
        "Server": "Windows-Azure-Table/1.0 Microsoft-HTTPAPI/2.0",
        "x-ms-request-id": request_id,
        "x-ms-version": request_headers.get("x-ms-version", "2019-02-02"),
        "x-ms-error-code": code,
        "X-Content-Type-Options": "nosniff",
        "Date": formatdate(usegmt=True),
    }
    if client_request_id := request_headers.get("x-ms-client-request-id"):
        headers["x-ms-client-request-id"] = client_request_id
    return web.Response(status=status, headers=headers, body=json.dumps(body).encode())


def operation_timed_out(request_headers: Mapping[str, str]) -> web.Response:
    return table_error(500, OPERATION_TIMED_OUT, OPERATION_TIMED_OUT_MESSAGE, request_headers)


class FaultDropped(RuntimeError):
    """The proxy closed before a held write was forwarded: it never reached Azurite."""


@dataclass(eq=False)
class Fault:
    """One armed fault. Awaitables: `wait_hit()`, `commit()`, `landed()`."""

    proxy: FaultyTableProxy = field(repr=False)
    mode: Mode
    match: Match
    delay: float | None = None  # late / timeout(forward="after"): forward after this many seconds
    retries: Retries = "forward"
    forward: Literal["before", "after"] = "before"  # timeout only
    hold: float = 60.0  # timeout: the longest an answer is held (then 500 OperationTimedOut)

    request: TableRequest | None = None  # the first attempt it faulted
    attempts: int = 0  # every attempt of that SDK call seen by the proxy, the first included
    retry_answers: list[int] = field(default_factory=list)  # the status each retry got
    client_gave_up: bool = False  # timeout: the client closed the connection while held
    landed_status: int | None = None  # Azurite's answer to the faulted attempt, once forwarded
    landed_body: bytes | None = None

    def __post_init__(self) -> None:
        self._hit = asyncio.Event()
        self._commit = asyncio.Event()
        self._released = asyncio.Event()
        self._gave_up = asyncio.Event()
        self._attempted = asyncio.Condition()
        self._landed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._landing: asyncio.Task | None = None

    # --- for tests ---

    @property
    def hit(self) -> bool:
        return self._hit.is_set()

    async def wait_hit(self, within: float = 10.0) -> TableRequest:
        """Until a request has matched: for `late` and `lost_answer` its 500 is about to go out
        (`lost_answer`: after the write landed); for `timeout`, its hold has begun."""
        await asyncio.wait_for(self._hit.wait(), within)
        assert self.request is not None
        return self.request

    async def wait_attempts(self, count: int, within: float = 10.0) -> None:
        """Until the proxy has seen `count` attempts of the faulted call (1 = the first)."""
        async with self._attempted:
            await asyncio.wait_for(self._attempted.wait_for(lambda: self.attempts >= count), within)

    async def wait_client_gave_up(self, within: float = 10.0) -> None:
        """Until a held client has closed its connection (`timeout`)."""
        await asyncio.wait_for(self._gave_up.wait(), within)

    async def commit(self, within: float = 10.0) -> int:
        """Forward the held write now (if it has not been) and return Azurite's status for it:
        e.g. 201 for an insert that landed, 409 if a retry or another writer got there first."""
        await self.wait_hit(within)
        self._commit.set()
        return await self.landed(within)

    async def landed(self, within: float = 10.0) -> int:
        """Azurite's status for the faulted attempt, once it has been forwarded (without forcing)."""
        return await asyncio.wait_for(asyncio.shield(self._landed), within)

    def release(self) -> None:
        """Let a held answer go (`timeout`) and stop failing retries (`retries="fail"`)."""
        self._released.set()

    # --- the proxy's side ---

    def matches(self, request: TableRequest) -> bool:
        return request.call == self.match if isinstance(self.match, str) else bool(self.match(request))

    async def first_attempt(self, seen: TableRequest, request: web.Request) -> web.StreamResponse:
        self.request = seen
        await self._count_attempt()
        if self.mode == "lost_answer" or (self.mode == "timeout" and self.forward == "before"):
            await self._land(seen)
        else:
            self._landing = asyncio.create_task(self._land_later(seen))
        self._hit.set()
        if self.mode == "timeout":
            await self._hold(request)
        return self._answer(seen)

    async def retry(self, seen: TableRequest, request: web.Request) -> web.StreamResponse:
        await self._count_attempt()
        if self.retries == "fail" and not self._released.is_set():
            if self.mode == "timeout":
                await self._hold(request)
            self.retry_answers.append(500)
            return self._answer(seen)
        response = await self.proxy.pass_through(seen)
        self.retry_answers.append(response.status)
        return response

    async def _count_attempt(self) -> None:
        async with self._attempted:
            self.attempts += 1
            self._attempted.notify_all()

    def _answer(self, seen: TableRequest) -> web.Response:
        self.proxy.injected[f"{seen.call} 500 {OPERATION_TIMED_OUT}"] += 1
        return operation_timed_out(seen.headers)

    async def _land(self, seen: TableRequest) -> None:
        try:
            status, _headers, payload = await self.proxy.send_upstream(seen)
        except Exception as error:  # noqa: BLE001 - handed to whoever awaits landed()
            self._fail_landing(error)
            return
        self.landed_status, self.landed_body = status, payload
        if not self._landed.done():
            self._landed.set_result(status)

    async def _land_later(self, seen: TableRequest) -> None:
        try:
            await asyncio.wait_for(self._commit.wait(), self.delay)
        except TimeoutError:
            pass
        await self._land(seen)

    async def _hold(self, request: web.Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold
        while not self._released.is_set() and loop.time() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                self.client_gave_up = True
                self._gave_up.set()
                return
            try:
                await asyncio.wait_for(self._released.wait(), 0.05)
            except TimeoutError:
                pass

    async def close(self) -> None:
        self._released.set()
        if self._landing is not None and not self._landing.done():
            self._landing.cancel()
            try:
                await self._landing
            except asyncio.CancelledError:
                pass
        self._fail_landing(FaultDropped(f"{self.mode} fault: the write never reached Azurite"))

    def _fail_landing(self, error: BaseException) -> None:
        if not self._landed.done():
            self._landed.set_exception(error)
            self._landed.exception()  # retrieved: landed() raises it, asyncio need not log it


class FaultyTableProxy(TableCountingProxy):
    """https://127.0.0.1:<port>/<account> -> Azurite's Table endpoint, with one-shot faults.

    Unarmed, it forwards every request unchanged (as TableCountingProxy, which it is). Use
    `endpoint` as TABLES_ENDPOINT (managed identity) or `connection_string(stack)` (a key).
    """

    def __init__(self, target_endpoint: str, tls_dir: Path) -> None:
        super().__init__(target_endpoint, tls_dir)
        self.faults: list[Fault] = []  # every fault armed, in order
        self._armed: list[Fault] = []  # not yet met
        self._owners: dict[str, Fault] = {}  # request identity -> the fault that took it
        self.attempts: Counter[str] = Counter()  # request identity -> attempts seen
        self.injected: Counter[str] = Counter()  # '<call> <status> <code>' the proxy made up

    @classmethod
    def for_stack(cls, stack) -> FaultyTableProxy:
        return cls(stack["tables_endpoint"], Path(stack["ca_bundle"]).parent)

    def connection_string(self, stack) -> str:
        """The stack's Table connection string (a key) with its endpoint pointed at the proxy."""
        parts = [p for p in stack["tables_connection_string"].split(";") if p]
        parts = [p for p in parts if not p.startswith("TableEndpoint=")] + [f"TableEndpoint={self.endpoint}"]
        return ";".join(parts) + ";"

    def arm(
        self,
        mode: Mode,
        match: Match,
        *,
        delay: float | None = None,
        retries: Retries = "forward",
        forward: Literal["before", "after"] = "before",
        hold: float = 60.0,
    ) -> Fault:
        """A one-shot fault for the next request that `match`es: a classify() name such as
        'insert mapping', or a predicate over TableRequest (see `row`). Call it from the test's
        event loop (an async test), before the request is sent."""
        if mode not in ("late", "timeout", "lost_answer"):
            raise ValueError(f"unknown fault mode {mode!r}")
        if retries not in ("forward", "fail"):
            raise ValueError(f"unknown retries {retries!r}")
        if forward not in ("before", "after"):
            raise ValueError(f"unknown forward {forward!r}")
        fault = Fault(self, mode, match, delay=delay, retries=retries, forward=forward, hold=hold)
        self.faults.append(fault)
        self._armed.append(fault)
        return fault

    def retried(self) -> dict[str, int]:
        """Requests the proxy saw more than once (by identity): attempts each."""
        return {identity: n for identity, n in self.attempts.items() if n > 1}

    async def __aexit__(self, *exc) -> None:
        for fault in self.faults:
            await fault.close()
        await super().__aexit__(*exc)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = TableRequest.of(request, body)
        self.calls[seen.call] += 1
        self.attempts[seen.identity] += 1
        if (owner := self._owners.get(seen.identity)) is not None:
            return await owner.retry(seen, request)
        fault = next((f for f in self._armed if f.matches(seen)), None)
        if fault is None:
            return await self.pass_through(seen)
        self._armed.remove(fault)
        self._owners[seen.identity] = fault
        return await fault.first_attempt(seen, request)

    async def send_upstream(self, seen: TableRequest) -> tuple[int, dict[str, str], bytes]:
        """The request exactly as the client sent it: Shared Key signs the path as sent and the
        Content-Type, so the URL is not requoted and aiohttp adds no Content-Type of its own
        (TableCountingProxy does both, harmless with the bearer tokens the bench uses, but a key's
        signature of a GET or DELETE then fails with 400 InvalidAuthenticationInfo)."""
        headers = {k: v for k, v in seen.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self.session.request(
            seen.method,
            URL(self.target + seen.raw_path, encoded=True),
            headers=headers,
            data=seen.body or None,
            skip_auto_headers=() if "content-type" in {k.lower() for k in headers} else ("Content-Type",),
        ) as answer:
            payload = await answer.read()
            self.statuses[f"{seen.call} {answer.status}"] += 1
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            return answer.status, out, payload

    async def pass_through(self, seen: TableRequest) -> web.Response:
        status, headers, payload = await self.send_upstream(seen)
        return web.Response(status=status, headers=headers, body=payload)


@pytest.fixture(name="table_faults")
async def table_faults_fixture(stack) -> AsyncIterator[FaultyTableProxy]:
    """A FaultyTableProxy in front of the session stack's Azurite, for one test."""
    async with FaultyTableProxy.for_stack(stack) as proxy:
        yield proxy


async def configure_service(
    monkeypatch: pytest.MonkeyPatch,
    stack,
    proxy: FaultyTableProxy,
    *,
    read_timeout: float | None = None,
    retry_total: int | None = None,
    **settings: str,
) -> None:
    """Point the in-process service (shared/) at the proxy: managed identity, TABLES_ENDPOINT the
    proxy's. `read_timeout` / `retry_total` override the service's TABLE_CLIENT_OPTIONS for this
    test (its clients are rebuilt here, so they take them)."""
    from shared import compose
    from tests.service_fixtures import configure

    if read_timeout is not None:
        monkeypatch.setitem(compose.TABLE_CLIENT_OPTIONS, "read_timeout", read_timeout)
    if retry_total is not None:
        monkeypatch.setitem(compose.TABLE_CLIENT_OPTIONS, "retry_total", retry_total)
    await configure(monkeypatch, stack, managed_identity=True, TABLES_ENDPOINT=proxy.endpoint, **settings)


@pytest.fixture(name="faulty_service")
async def faulty_service_fixture(stack, emulator, monkeypatch, table_faults):
    """The service configured with managed identity, its Table requests through `table_faults`.
    Yields tests.service_helpers.Users; ask for `table_faults` too to arm faults."""
    from shared.compose import reset_services
    from shared.settings import reset_settings
    from tests.service_helpers import Users

    await configure_service(monkeypatch, stack, table_faults)
    yield Users(stack)
    await reset_services()
    reset_settings()
