"""Microsoft Graph's REST API, as the subscription needs it: one pipeline, and Graph's failures sorted.

Calls use the worker's one credential (an app token for Graph; the identity needs the application
permission User.Read.All, which Graph's subscription docs list for users) and one pipeline made on
first use. A failure that a retry may fix (Graph throttled or down, no token) raises `Retryable`;
any other answer is returned, and `refusal` names it with an outcome code. Logs carry outcome codes
and Graph's error code, never a token or a message.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..errors import Code

if TYPE_CHECKING:  # azure-core loads with the first Graph call
    from azure.core import AsyncPipelineClient

log = logging.getLogger("acs_token_service.graph")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# Graph's own answers: which ones a retry may fix.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
GRAPH_OPTIONS = {"retry_total": 1, "retry_backoff_factor": 0.5, "retry_backoff_max": 2}
# Event Grid waits 30 s for the webhook: two attempts at these timeouts stay under it.
TIMEOUTS = {"connection_timeout": 5, "read_timeout": 8}
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.]{1,64}\Z")


class Retryable(Exception):
    """Graph throttled, down or unreachable, or no token for it: a later try may work."""

    def __init__(self, code: Code, retry_after: int = 30) -> None:
        super().__init__(code)
        self.code, self.retry_after = code, retry_after


def expiry(body: dict, fallback: dt.datetime) -> dt.datetime:
    """expirationDateTime as Graph answered it (7 fractional digits and Z), else what was asked."""
    value = body.get("expirationDateTime")
    try:
        stamp = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        stamp = None
    return stamp.astimezone(dt.UTC) if stamp is not None and stamp.tzinfo else fallback


def scope_for(endpoint: str) -> str:
    """The token scope for a Graph endpoint: its own `/.default` (national clouds have their own
    Graph hosts), except on loopback, where the local stack's stand-in plays the global cloud."""
    host = urlparse(endpoint).hostname or ""
    return GRAPH_SCOPE if host in ("127.0.0.1", "localhost", "::1") else f"{endpoint}/.default"


def refusal(status: int, body: dict) -> str:
    """Our outcome code for a Graph refusal, logged with Graph's own error code (no message:
    codes are what operators search for, and a message might quote the request)."""
    error = body.get("error")
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code", ""))
    graph_code = code if _ERROR_CODE.match(code) else "unknown"
    outcome = {404: "subscription_not_found", 401: "graph_forbidden", 403: "graph_forbidden"}.get(
        status, "graph_rejected"
    )
    log.warning("Microsoft Graph refused: %s (HTTP %d, %s)", outcome, status, graph_code)
    return outcome


class GraphClient:
    """Graph over HTTP for one worker; the SDK loads and the pipeline is made on the first call."""

    def __init__(
        self,
        endpoint: str,
        *,
        credential: Any | None,
        make_credential: Callable[[], Any],
        transport_options: dict | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._credential = credential
        self._make_credential = make_credential
        self._owns_credential = False
        self._transport_options = transport_options or {}
        self._client: AsyncPipelineClient | None = None

    def _pipeline(self):
        """One azure-core pipeline per worker, made on first use: retries (Retry-After honoured), the
        worker's credential as bearer for Graph, azure-core's header redaction in its logging."""
        if self._client is None:
            from azure.core import AsyncPipelineClient
            from azure.core.pipeline.policies import (
                AsyncBearerTokenCredentialPolicy,
                AsyncRetryPolicy,
                HeadersPolicy,
                HttpLoggingPolicy,
                UserAgentPolicy,
            )
            from azure.core.pipeline.transport import AioHttpTransport

            if self._credential is None:  # keys for ACS and Storage, but Graph takes no key
                self._credential, self._owns_credential = self._make_credential(), True
            self._client = AsyncPipelineClient(
                base_url=self.endpoint,
                policies=[
                    HeadersPolicy({"Accept": "application/json"}),
                    UserAgentPolicy(sdk_moniker="acs-token-service"),
                    AsyncRetryPolicy(**GRAPH_OPTIONS),
                    AsyncBearerTokenCredentialPolicy(self._credential, scope_for(self.endpoint)),
                    HttpLoggingPolicy(),
                ],
                transport=AioHttpTransport(**TIMEOUTS, **self._transport_options),
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._owns_credential and self._credential is not None:
            await self._credential.close()

    async def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body) of a Graph call; raises Retryable for what a retry may fix."""
        from azure.core.exceptions import AzureError, ClientAuthenticationError
        from azure.core.rest import HttpRequest

        request = HttpRequest(method, f"{self.endpoint}/v1.0/{path}", json=body)
        try:
            response = await self._pipeline().send_request(request)
        except ClientAuthenticationError:  # the managed identity got no token for Graph
            raise Retryable(Code.GRAPH_TOKEN_UNAVAILABLE) from None
        except AzureError:  # connection refused, reset or timed out, after the pipeline's retries
            raise Retryable(Code.GRAPH_UNREACHABLE) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code in RETRYABLE:
            after = response.headers.get("Retry-After", "")
            raise Retryable(Code.GRAPH_UNAVAILABLE, int(after) if after.isdigit() else 30)
        return response.status_code, payload if isinstance(payload, dict) else {}
