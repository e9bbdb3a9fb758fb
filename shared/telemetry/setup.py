"""Export to Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set, configured off the event loop.

`azure.monitor.opentelemetry` is imported here, in `configure`, and nowhere else, so importing
function_app stays free of I/O and of that import. Until it has run, every instrument and span
(`measure.py`) is a cheap no-op.

Log records take one path to Application Insights, the Functions host's: the Python worker
forwards every record logged during an invocation to the host, which sends it as a trace
(category Function.<name>.User, with the invocation's operation id). The distro exports metrics
and spans only; its log exporter would send each record a second time (see `configure`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Mapping

log = logging.getLogger("acs_token_service.telemetry")

CONNECTION_STRING_SETTING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
SERVICE_NAME = "acs-token-service"
# The service's own loggers. The distro's log export is off (LOGS_EXPORTER_SETTING); were it ever on,
# it would still take only these, never the root logger, where the Azure SDK logs request URLs.
EXPORTED_LOGGER = "acs_token_service"
# The distro's documented switch for its log pipeline ("none": no LoggerProvider, no handler);
# azure-monitor-opentelemetry 1.8 overwrites a `disable_logging` keyword with this variable's value.
LOGS_EXPORTER_SETTING = "OTEL_LOGS_EXPORTER"
# azure-monitor-opentelemetry's auto-instrumentations. azure_sdk would trace every SDK request
# with its URL; the HTTP client ones would do the same for the managed-identity endpoint.
DISABLED_INSTRUMENTATIONS = (
    "azure_sdk",
    "requests",
    "urllib",
    "urllib3",
    "django",
    "fastapi",
    "flask",
    "psycopg2",
)

_configured = False
_configure_lock = threading.Lock()


def _connection_string(environ: Mapping[str, str] | None) -> str:
    return ((os.environ if environ is None else environ).get(CONNECTION_STRING_SETTING) or "").strip()


def configure(environ: dict[str, str] | None = None) -> bool:
    """Install Azure Monitor's providers once, if APPLICATIONINSIGHTS_CONNECTION_STRING is set.

    Blocks for a second or more (the distro's import, its resource detectors): the worker calls
    it through `configure_in_background`. True when export is on. A failure to configure is
    logged and leaves telemetry off: it must not take the token service down with it.

    Metrics and spans only: logs already reach Application Insights through the worker and the
    host, and the host drops its copy only for a worker that declares it logs to Application
    Insights itself (capability WorkerApplicationInsightsLoggingEnabled, GrpcWorkerChannel.cs in
    azure-functions-host), which azure-functions-runtime never declares. The distro's log export
    would duplicate every record, so OTEL_LOGS_EXPORTER=none is set in the process first.
    """
    global _configured
    env = os.environ if environ is None else environ
    connection_string = _connection_string(env)
    if not connection_string:
        return False
    with _configure_lock:
        if _configured:
            return True
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor
            from opentelemetry.sdk.resources import Resource

            attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
            os.environ[LOGS_EXPORTER_SETTING] = "none"  # the distro reads os.environ, not `env`
            configure_azure_monitor(
                connection_string=connection_string,
                logger_name=EXPORTED_LOGGER,
                resource=Resource.create(attributes),
                instrumentation_options={name: {"enabled": False} for name in DISABLED_INSTRUMENTATIONS},
            )
        except Exception as err:  # noqa: BLE001 - telemetry is optional; the service is not
            log.error("Azure Monitor export not configured: %s", type(err).__name__)
            return False
        _configured = True
        log.info("Azure Monitor export configured")
        return True


def configure_in_background(environ: dict[str, str] | None = None) -> threading.Thread | None:
    """Run `configure` on a thread of its own, so the event loop that builds the clients keeps serving.

    The worker builds its clients inside its first request, on the loop every request shares;
    importing the distro and configuring it takes a second or more, which that loop would spend
    answering nobody. Requests in that second are not exported. The thread runs in the caller's
    context, so its log records are tagged with the invocation that started it (the host keeps
    them while that invocation runs). None when there is nothing to configure.
    """
    if _configured or not _connection_string(environ):
        return None
    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(configure, environ),
        name="telemetry-configure",
        daemon=True,  # never holds the worker's exit; an unfinished configuration exports nothing anyway
    )
    thread.start()
    return thread
