"""Telemetry: metrics and spans from a real flow against the local stack, and never a secret in them.

The OpenTelemetry SDK's in-memory metric reader and span exporter are installed as the global
providers (what Azure Monitor's distro does in Azure), the service runs token, Teams, revoke and
delete requests against Azurite and the emulator, and the test reads what was recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import function_app
from devstack.acs_state import TEAMS_AUDIENCE
from devstack.issuer import object_id_for
from shared import compose, telemetry
from shared.settings import load
from shared.telemetry import setup as telemetry_setup
from tests.conftest import REPO_ROOT
from tests.service_helpers import body_of, request

_READER = InMemoryMetricReader()
_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
def otel():
    """Global SDK providers, once per process (OpenTelemetry refuses to replace them)."""
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        trace.set_tracer_provider(provider)
    assert isinstance(metrics.get_meter_provider(), MeterProvider), "another test installed a provider"
    return SimpleNamespace(reader=_READER, spans=_SPANS)


def _points(reader: InMemoryMetricReader) -> Counter:
    """(metric name, frozen attributes) -> value (sums) or count (histograms), cumulative."""
    found: Counter = Counter()
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    value = point.count if isinstance(point, HistogramDataPoint) else point.value
                    found[(metric.name, frozenset(point.attributes.items()))] += value
    return found


def _delta(before: Counter, after: Counter, name: str, **attributes) -> int:
    key = (name, frozenset(attributes.items()))
    return after[key] - before[key]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def _secrets_of(stack, *, subjects, bodies, bearers) -> set[str]:
    secrets = set(subjects) | {object_id_for(s) for s in subjects} | set(bearers)
    for body in bodies:
        secrets.add(body["token"])
        secrets.update(v for k, v in body.items() if k in ("communicationUserId", "microsoftTeamsUserId"))
    for name in ("acs_connection_string", "tables_connection_string", "storage_connection_string"):
        connection_string = stack[name]
        secrets.add(connection_string)
        for part in connection_string.split(";"):
            key, _, value = part.partition("=")
            if key.lower() in ("accesskey", "accountkey") and value:
                secrets.add(value)
    secrets.add(stack["function_key"])
    secrets.add(stack["identity_header"])
    # ids appear percent-encoded in URLs; a JWT's signature alone is a secret too
    secrets |= {unquote(s) for s in secrets} | {s.rsplit(".", 1)[-1] for s in secrets if s.count(".") == 2}
    return {s for s in secrets if len(s) >= 8}


async def test_calls_the_throttle_answers_itself_are_counted_apart_from_acs_429s(otel, service, emulator):
    """shared/throttle.py: after ACS's 429 with Retry-After, the next call is answered here."""
    bearers = [service.token(user) for user in ("tel-shed-1", "tel-shed-2")]
    for bearer in bearers:
        issued = await function_app.issue_token(request("POST", "token", token=bearer))
        assert issued.status_code == 200
    before = _points(otel.reader)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    for bearer in bearers:
        refused = await function_app.refresh_token(
            request("POST", "token/refresh", token=bearer, body={"expiresInMinutes": 61})
        )
        assert refused.status_code == 429
    after = _points(otel.reader)
    assert (
        _delta(before, after, "acs_token_service.acs.throttled", **{"acs.operation": "issueAccessToken"}) == 1
    )
    assert (
        _delta(before, after, "acs_token_service.acs.refused_here", **{"acs.operation": "issueAccessToken"})
        == 1
    )


async def test_metrics_and_spans_of_a_real_flow_hold_no_secrets(otel, service, emulator):
    stack = service.stack
    alice, bob, tina = "tel-subject-8f2c41", "tel-subject-3b9d07", "tel-subject-5e1a66"
    bearers = {user: service.token(user) for user in (alice, bob, tina)}
    teams_token = service.token(tina, audience=TEAMS_AUDIENCE, app_id=stack["teams_app_id"])
    otel.spans.clear()
    before = _points(otel.reader)

    async def call(handler, route, user, body=None, method="POST"):
        response = await handler(request(method, route, token=bearers[user], body=body))
        assert response.status_code < 300, response.get_body()
        return response

    bodies = [body_of(await call(function_app.issue_token, "token", alice))]
    # Another lifetime: a token of its own from ACS, not the fresh one answered again (shared/storm.py).
    bodies.append(
        body_of(await call(function_app.refresh_token, "token/refresh", alice, {"expiresInMinutes": 61}))
    )
    bodies.append(
        body_of(await call(function_app.teams_token, "teams/token", tina, {"teamsAccessToken": teams_token}))
    )
    # Without Retry-After: one with it would hold every revoke for that long (shared/throttle.py).
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    pending = await call(function_app.revoke_tokens, "token/revoke", alice)
    assert pending.status_code == 202
    emulator.faults(throttleRate=0)
    bodies.append(body_of(await call(function_app.issue_token, "token", bob, {"scopes": ["voip"]})))
    assert (await call(function_app.revoke_tokens, "token/revoke", bob)).status_code == 200
    assert (await call(function_app.delete_identity, "identity", bob, method="DELETE")).status_code == 200

    after = _points(otel.reader)
    delta = lambda name, **a: _delta(before, after, f"acs_token_service.{name}", **a)  # noqa: E731
    tokens = "tokens.issued"
    assert delta(tokens, **{"token.kind": "communication_user", "token.scopes": "chat,voip",
                            "identity.created": True}) == 1  # fmt: skip
    assert delta(tokens, **{"token.kind": "communication_user", "token.scopes": "chat,voip",
                            "identity.created": False}) == 1  # fmt: skip
    assert delta(tokens, **{"token.kind": "communication_user", "token.scopes": "voip",
                            "identity.created": True}) == 1  # fmt: skip
    assert delta(tokens, **{"token.kind": "teams_user", "identity.created": False}) == 1
    assert delta("identities.created") == 2
    revocations = "revocations"
    assert delta(revocations, **{"revocation.operation": "revoke", "revocation.status": "pending",
                                 "revocation.source": "user"}) == 1  # fmt: skip
    assert delta(revocations, **{"revocation.operation": "revoke", "revocation.status": "revoked",
                                 "revocation.source": "user"}) == 1  # fmt: skip
    assert delta(revocations, **{"revocation.operation": "delete", "revocation.status": "deleted",
                                 "revocation.source": "user"}) == 1  # fmt: skip
    duration = "acs.duration"
    assert delta(duration, **{"acs.operation": "createIdentity", "outcome": "ok"}) == 2
    assert delta(duration, **{"acs.operation": "issueAccessToken", "outcome": "ok"}) == 1
    assert delta(duration, **{"acs.operation": "exchangeTeamsToken", "outcome": "ok"}) == 1
    assert delta(duration, **{"acs.operation": "revokeAccessTokens", "outcome": "acs_throttled"}) == 1
    assert delta(duration, **{"acs.operation": "revokeAccessTokens", "outcome": "ok"}) == 1
    assert delta(duration, **{"acs.operation": "deleteIdentity", "outcome": "ok"}) == 1
    # One throttled revoke call, but every 429 the gateway retried is counted.
    assert delta("acs.throttled", **{"acs.operation": "revokeAccessTokens"}) >= 2

    spans = otel.spans.get_finished_spans()
    names = Counter(span.name for span in spans)
    assert names["ACS createIdentity"] == 2 and names["ACS exchangeTeamsToken"] == 1
    assert (
        names["Table get"] >= 4
        and names["Table file_new"] == names["Table insert"] == 2
        and names["Table mark_pending"] == 2  # the throttled revoke, and the delete (durable first)
        and names["Table forget_pending"] == 1  # the delete went through: its queued work goes
    )
    throttled = [
        s for s in spans if s.name == "ACS revokeAccessTokens" and s.status.status_code == StatusCode.ERROR
    ]
    assert len(throttled) == 1 and throttled[0].kind == SpanKind.CLIENT
    assert throttled[0].attributes["outcome"] == "acs_throttled"
    assert sum(e.name == "acs.throttled" for e in throttled[0].events) >= 2
    table_get = next(s for s in spans if s.name == "Table get")
    assert table_get.attributes["db.operation.name"] == "get" and table_get.attributes["outcome"] == "ok"

    # Nothing recorded holds a token, JWT, key, connection string, subject, object id or ACS id.
    secrets = _secrets_of(
        stack, subjects=(alice, bob, tina), bodies=bodies, bearers=[*bearers.values(), teams_token]
    )
    recorded: list[str] = []
    for span in spans:
        recorded.append(span.name)
        for value in span.attributes.values():
            recorded += _strings(value)
        for event in span.events:
            recorded.append(event.name)
            for value in event.attributes.values():
                recorded += _strings(value)
        if span.status.description:
            recorded.append(span.status.description)
    for name, attributes in after:
        recorded.append(name)
        for _key, value in attributes:
            recorded += _strings(value)
    assert recorded
    leaks = {(secret[:12] + "...", value[:40]) for value in recorded for secret in secrets if secret in value}
    assert not leaks
    assert not [v for v in recorded if "eyJ" in v or "8:acs:" in v or "8:orgid:" in v]


# ---- Azure Monitor is configured lazily ------------------------------------------------------------------


def test_importing_function_app_does_not_import_azure_monitor():
    code = (
        "import sys, function_app; "
        "lazy = ('azure.monitor', 'opentelemetry.sdk'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(lazy))))"
    )
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000"}
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=REPO_ROOT,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == []


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "APPLICATIONINSIGHTS_CONNECTION_STRING"}


def test_configure_imports_the_distro_only_with_a_connection_string(monkeypatch):
    calls: list[dict] = []
    fake = SimpleNamespace(configure_azure_monitor=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "azure.monitor.opentelemetry", fake)
    monkeypatch.setattr(telemetry_setup, "_configured", False)
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "console")  # an operator's value; restored afterwards

    assert telemetry.configure({}) is False
    assert telemetry.configure({"APPLICATIONINSIGHTS_CONNECTION_STRING": "  "}) is False
    assert calls == []

    connection_string = (
        "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://x.invalid/"
    )
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string}
    assert telemetry.configure(env) is True
    assert telemetry.configure(env) is True  # once per process
    assert len(calls) == 1
    options = calls[0]
    assert options["connection_string"] == connection_string
    assert options["logger_name"] == "acs_token_service"
    # SDK auto-tracing would put request URLs (with ACS identity ids) into span attributes.
    assert options["instrumentation_options"]["azure_sdk"] == {"enabled": False}
    assert options["resource"].attributes["service.name"] == "acs-token-service"
    # Logs go to Application Insights through the host; the distro's log export stays off.
    assert os.environ["OTEL_LOGS_EXPORTER"] == "none"


def test_a_failing_distro_leaves_the_service_running(monkeypatch, caplog):
    def broken(**_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(
        sys.modules, "azure.monitor.opentelemetry", SimpleNamespace(configure_azure_monitor=broken)
    )
    monkeypatch.setattr(telemetry_setup, "_configured", False)
    assert telemetry.configure({"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}) is False
    assert "RuntimeError" in caplog.text and "InstrumentationKey" not in caplog.text


def test_building_the_clients_does_not_wait_for_the_distro(monkeypatch):
    """The worker builds its clients inside its first request, on the event loop every request
    shares. Importing and configuring the distro takes a second or more: it runs on a thread of its
    own, so building returns (and the loop serves) while the distro is still busy."""
    release, calls = threading.Event(), []

    def slow_distro(**kwargs):
        release.wait(30)  # the distro's import and its resource detectors, for as long as the test says
        calls.append(kwargs)

    monkeypatch.setitem(
        sys.modules, "azure.monitor.opentelemetry", SimpleNamespace(configure_azure_monitor=slow_distro)
    )
    monkeypatch.setattr(telemetry_setup, "_configured", False)
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "console")  # restored afterwards
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", "InstrumentationKey=x")
    worker = compose.compose(
        load(
            {
                "AUTH_ISSUER": "https://idp.example",
                "AUTH_AUDIENCE": "api",
                "ACS_CONNECTION_STRING": "endpoint=https://acs.example/;accesskey=a2V5",
                "TABLES_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=a2V5;"
                "TableEndpoint=https://a.table.example/",
            }
        )
    )
    try:
        assert calls == []  # built, and the distro still configuring
        (configuring,) = [t for t in threading.enumerate() if t.name == "telemetry-configure"]
        release.set()
        configuring.join(30)
        assert len(calls) == 1 and calls[0]["connection_string"] == "InstrumentationKey=x"
        assert telemetry.configure_in_background() is None  # configured: nothing more to start
    finally:
        release.set()
        asyncio.run(worker.close())


# ---- each log record reaches Application Insights once ---------------------------------------------------

# Runs in a child process: the real distro installs global OpenTelemetry providers, which the
# module's own in-memory providers above already hold in this one. The distro's pipelines get the
# SDK's in-memory exporters (its documented `span_processors` / `log_record_processors` options);
# the worker's path is devstack.worker.RpcLogHandler, the handler that sends each record to the
# host as an RpcLog, as Azure's worker does, with its connection captured.
_ONE_PATH_CHILD = r"""
import contextvars, json, logging, os, sys
from opentelemetry import trace
from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import azure.monitor.opentelemetry as distro
from devstack.worker import RpcLogHandler
from shared import telemetry

otel_logs, otel_spans = InMemoryLogExporter(), InMemorySpanExporter()
real_configure = distro.configure_azure_monitor

def configure_in_memory(**options):
    real_configure(
        **options,
        log_record_processors=[SimpleLogRecordProcessor(otel_logs)],
        span_processors=[SimpleSpanProcessor(otel_spans)],
        sampling_ratio=1.0,  # every span, not the default rate limit's first-second budget
        enable_live_metrics=False,
        enable_performance_counters=False,
        disable_offline_storage=True,
    )

distro.configure_azure_monitor = configure_in_memory

forwarded = []
class Connection:
    def send(self, rpc_log):
        forwarded.append({"category": rpc_log.category, "message": rpc_log.message,
                          "invocation_id": rpc_log.invocation_id})
class Runtime:
    invocation_id_cv = contextvars.ContextVar("invocation_id", default="inv-1")

root = logging.getLogger()
root.handlers[:] = [RpcLogHandler(Connection(), Runtime())]
root.setLevel(logging.INFO)  # the worker's root logging

assert telemetry.configure(), "telemetry.configure() did not configure the distro"
service = logging.getLogger("acs_token_service.tokens")
with trace.get_tracer("test").start_as_current_span("invocation"):
    service.info("service record one")
    service.warning("service record two")
logging.getLogger("azure.core.pipeline").warning("sdk record")
print(json.dumps({
    "forwarded": forwarded,
    "otel_logs": [record.log_record.body for record in otel_logs.get_finished_logs()],
    "otel_spans": [span.name for span in otel_spans.get_finished_spans()],
    "otel_logs_exporter": os.environ.get("OTEL_LOGS_EXPORTER"),
}))
sys.stdout.flush()
os._exit(0)  # no exit-time flush: the exporters have nowhere to send to
"""


def test_each_service_log_record_is_exported_once_through_the_host():
    env = {
        **_base_env(),
        # A loopback ingestion endpoint nothing listens on, and nothing else that calls out:
        # no statsbeat, no control-plane settings, no Azure VM metadata probe.
        "APPLICATIONINSIGHTS_CONNECTION_STRING": (
            "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
            "IngestionEndpoint=http://127.0.0.1:9/;LiveEndpoint=http://127.0.0.1:9/"
        ),
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "azure_app_service",
        "OTEL_METRICS_EXPORTER": "none",
    }
    env.pop("OTEL_LOGS_EXPORTER", None)
    out = subprocess.run(
        [sys.executable, "-c", _ONE_PATH_CHILD],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    # The path kept: the worker forwards each service record to the host exactly once.
    service_records = [f for f in result["forwarded"] if f["category"].startswith("acs_token_service")]
    messages = Counter(f["message"] for f in service_records)
    assert messages == {
        "Azure Monitor export configured": 1,
        "service record one": 1,
        "service record two": 1,
    }
    assert all(f["invocation_id"] == "inv-1" for f in result["forwarded"])
    # The other path: the distro is on and exports spans, but no log record at all.
    assert "invocation" in result["otel_spans"]
    assert result["otel_logs"] == []
    assert result["otel_logs_exporter"] == "none"
