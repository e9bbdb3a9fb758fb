"""What the service counts and times: OpenTelemetry metrics and spans at its boundaries.

Everything here goes through the OpenTelemetry *API*: until a provider is installed (`setup.py`),
every instrument and span is a cheap no-op.

What telemetry may carry: operation names, outcome codes (our stable error codes), HTTP status
codes, scope names, counts and durations. Never a token, JWT, key, connection string, user
subject, object id or ACS identity id: attributes are built only from the fixed labels below,
exceptions are never recorded (their messages may quote a request), and Azure SDK auto-tracing,
whose spans carry request URLs with ACS identity ids in the path, stays off.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..errors import ServiceError

INSTRUMENTATION_NAME = "acs_token_service"

_tracer = trace.get_tracer(INSTRUMENTATION_NAME)
_meter = metrics.get_meter(INSTRUMENTATION_NAME)

TOKENS_ISSUED = _meter.create_counter(
    "acs_token_service.tokens.issued",
    unit="{token}",
    description="ACS access tokens handed to callers, by kind, scopes and whether the identity was new",
)
IDENTITIES_CREATED = _meter.create_counter(
    "acs_token_service.identities.created",
    unit="{identity}",
    description="ACS identities created and mapped to an app user",
)
REVOCATIONS = _meter.create_counter(
    "acs_token_service.revocations",
    unit="{request}",
    description="Revocations and deletions requested, by operation, final status and source",
)
ACS_DURATION = _meter.create_histogram(
    "acs_token_service.acs.duration",
    unit="s",
    description="Duration of ACS Identity calls, retries included, by operation and outcome",
)
ACS_THROTTLED = _meter.create_counter(
    "acs_token_service.acs.throttled",
    unit="{response}",
    description="429 answers from ACS, each attempt counted",
)
ACS_REFUSED_HERE = _meter.create_counter(
    "acs_token_service.acs.refused_here",
    unit="{call}",
    description="ACS calls the worker's throttle answered itself (429) instead of making, by operation",
)

# The ACS operation in progress, for the gateway's per-attempt counts below.
_acs_operation: contextvars.ContextVar[str] = contextvars.ContextVar("acs_operation", default="unknown")


def outcome_of(err: BaseException | None) -> str:
    """A bounded, secret-free label: "ok", one of our error codes, or an exception type name."""
    if err is None:
        return "ok"
    if isinstance(err, ServiceError):
        return err.code
    return type(err).__name__


def _status_code(err: BaseException | None) -> int | None:
    if isinstance(err, ServiceError):
        return err.status
    code = getattr(err, "status_code", None)
    return code if isinstance(code, int) else None


def _end(span: trace.Span, err: BaseException | None, attributes: dict[str, Any]) -> None:
    attributes["outcome"] = outcome_of(err)
    if not span.is_recording():
        return
    status = _status_code(err)
    if status is not None:
        attributes["error.status_code"] = status
    if err is not None:
        attributes["error.type"] = outcome_of(err)
    span.set_attributes(attributes)
    # Only the label: a description or a recorded exception could quote the request.
    span.set_status(Status(StatusCode.ERROR) if err is not None else Status(StatusCode.OK))


# ---- ACS -------------------------------------------------------------------------------------------


def acs_operation(operation: str) -> Callable:
    """Decorate an AcsGateway coroutine: a CLIENT span, the duration histogram, the 429 label."""

    def decorate(call: Callable) -> Callable:
        @functools.wraps(call)
        async def wrapper(*args, **kwargs):
            token = _acs_operation.set(operation)
            started = time.perf_counter()
            err: BaseException | None = None
            with _tracer.start_as_current_span(
                f"ACS {operation}",
                kind=SpanKind.CLIENT,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await call(*args, **kwargs)
                except BaseException as caught:
                    err = caught
                    raise
                finally:
                    _acs_operation.reset(token)
                    attributes: dict[str, Any] = {"acs.operation": operation}
                    _end(span, err, attributes)
                    ACS_DURATION.record(
                        time.perf_counter() - started,
                        {"acs.operation": operation, "outcome": attributes["outcome"]},
                    )

        return wrapper

    return decorate


def acs_throttled(retry_after: int | None) -> None:
    """One 429 of ACS's, each attempt counted (the gateway retries them), its Retry-After on the span."""
    operation = _acs_operation.get()
    ACS_THROTTLED.add(1, {"acs.operation": operation})
    event: dict[str, Any] = {"acs.operation": operation}
    if retry_after is not None:
        event["retry_after_s"] = retry_after
    trace.get_current_span().add_event("acs.throttled", event)


def acs_refused_here(operation: str) -> None:
    """A call the throttle answered without making it (shared/throttle.py)."""
    ACS_REFUSED_HERE.add(1, {"acs.operation": operation})
    trace.get_current_span().add_event("acs.refused_here", {"acs.operation": operation})


# ---- Table Storage -------------------------------------------------------------------------------


def _table_span(operation: str):
    return _tracer.start_as_current_span(
        f"Table {operation}",
        kind=SpanKind.CLIENT,
        record_exception=False,
        set_status_on_exception=False,
    )


def table_operation(operation: str) -> Callable:
    """Decorate a store method (coroutine or async generator) with a CLIENT span."""

    def decorate(call: Callable) -> Callable:
        attributes = {"db.system": "azure_table", "db.operation.name": operation}

        if inspect.isasyncgenfunction(call):

            @functools.wraps(call)
            async def iterate(*args, **kwargs) -> AsyncIterator:
                # Not made current: a generator may be closed in another context than it began in.
                span = _tracer.start_span(f"Table {operation}", kind=SpanKind.CLIENT)
                err: BaseException | None = None
                try:
                    async for item in call(*args, **kwargs):
                        yield item
                except GeneratorExit:  # the consumer stopped early: not a failure
                    raise
                except BaseException as caught:
                    err = caught
                    raise
                finally:
                    _end(span, err, dict(attributes))
                    span.end()

            return iterate

        @functools.wraps(call)
        async def wrapper(*args, **kwargs):
            err: BaseException | None = None
            with _table_span(operation) as span:
                try:
                    return await call(*args, **kwargs)
                except BaseException as caught:
                    err = caught
                    raise
                finally:
                    _end(span, err, dict(attributes))

        return wrapper

    return decorate


# ---- the token service and revocations ------------------------------------------------------------


def token_issued(*, kind: str, scopes: tuple[str, ...] | None, identity_created: bool) -> None:
    """`scopes` None: ACS chose them (Teams tokens)."""
    attributes: dict[str, Any] = {"token.kind": kind, "identity.created": identity_created}
    if scopes is not None:
        attributes["token.scopes"] = ",".join(sorted(scopes))
    TOKENS_ISSUED.add(1, attributes)
    if identity_created:
        IDENTITIES_CREATED.add(1)


def counts_tokens(call: Callable) -> Callable:
    """Decorate a TokenService coroutine that returns a TokenResult."""

    @functools.wraps(call)
    async def wrapper(*args, **kwargs):
        result = await call(*args, **kwargs)
        token_issued(
            kind="communication_user", scopes=result.scopes, identity_created=result.identity_created
        )
        return result

    return wrapper


def counts_revocations(operation: str) -> Callable:
    """Decorate a RevocationService coroutine `(record, *, source)` that returns an Outcome."""

    def decorate(call: Callable) -> Callable:
        @functools.wraps(call)
        async def wrapper(*args, source: str, **kwargs):
            result = await call(*args, source=source, **kwargs)
            REVOCATIONS.add(
                1,
                {
                    "revocation.operation": operation,
                    "revocation.status": result.status,
                    # "event:<type>" -> "event": a fixed set of labels, whatever the event types.
                    "revocation.source": source.split(":", 1)[0],
                },
            )
            return result

        return wrapper

    return decorate
