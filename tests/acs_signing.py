"""Signing raw requests with the SDK's own HMAC policy, for tests that must bend one thing."""

from __future__ import annotations

from urllib.parse import urlparse

from azure.communication.identity._shared.policy import HMACCredentialsPolicy
from azure.communication.identity._shared.utils import parse_connection_str
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest


def sdk_signed_headers(connection_string: str, method: str, url: str, body: str = "") -> dict[str, str]:
    """Headers exactly as the sync SDK would sign `method url body` (the path as given in `url`)."""
    host, key = parse_connection_str(connection_string)
    request = HttpRequest(method, url)
    request.body = body
    policy = HMACCredentialsPolicy(f"https://{host}", key)
    policy.on_request(PipelineRequest(request, PipelineContext(None)))
    headers = dict(request.headers)
    headers["Host"] = urlparse(url).netloc
    if body:
        headers["Content-Type"] = "application/json"
    return headers
