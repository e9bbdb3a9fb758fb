"""HTTP requests into RpcHttp and RpcHttp answers back into HTTP, as the Functions host converts them.

Request: Azure/azure-functions-host, src/WebJobs.Script.Grpc/MessageExtensions/
GrpcMessageConversionExtensions.cs (ToRpcHttp), for the capabilities the Python worker announces
(RawHttpBodyBytes, RpcHttpBodyOnly, RpcHttpTriggerMetadataRemoved; no nullable maps):
- `url` is scheme://Host + Path + QueryString, Path decoded as Kestrel decodes it;
- header names lower-cased, repeated values joined with "," (StringValues.ToString());
- query keys compared case-insensitively, values joined with ","; a key whose value is empty is
  left out;
- `params` are the route values;
- the body is sent, as bytes, only when Content-Length is above 0 (a chunked body without a
  length reaches the function empty, in Azure too).

Answer: RawScriptResult and HttpBinding in src/WebJobs.Script/Binding/Http/: the status from
`status_code` (200 when it does not parse), headers one value a name (the message's headers are a
map), `content-type` as the response's type, cookies as Set-Cookie lines, the body's bytes.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .routes import kestrel_decoded_path
from .rpc import protos

_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"  # PathString.ToUriComponent leaves these (and escapes) as they are
_SAME_SITE = {
    protos.RpcHttpCookie.Lax: "lax",
    protos.RpcHttpCookie.Strict: "strict",
    protos.RpcHttpCookie.ExplicitNone: "none",
}


def _joined(values: Any) -> dict[str, str]:
    """Repeated names as one, case-insensitively, under the first spelling (StringValues.ToString())."""
    joined: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for key, value in values.items():
        first = spelling.setdefault(key.lower(), key)
        joined[first] = f"{joined[first]},{value}" if first in joined else value
    return joined


async def to_rpc_http(request: web.Request, route_params: dict[str, str]) -> Any:
    path = quote(kestrel_decoded_path(request.rel_url.raw_path), safe=_PATH_SAFE)
    query = request.rel_url.raw_query_string
    http = protos.RpcHttp(
        method=request.method,
        url=f"{request.scheme}://{request.host}{path}{'?' + query if query else ''}",
        headers={name.lower(): value for name, value in _joined(request.headers).items()},
        query={key: value for key, value in _joined(request.query).items() if value},
        params=route_params,
    )
    if (request.content_length or 0) > 0:
        http.body.bytes = await request.read()
    return http


def _set_cookie(cookie: Any) -> str:
    """The line ASP.NET Core's ResponseCookies.Append writes; CookieOptions' path defaults to /."""
    parts = [f"{cookie.name}={cookie.value}"]
    if cookie.HasField("expires"):
        expires = cookie.expires.value.ToDatetime()
        parts.append(f"expires={expires.strftime('%a, %d %b %Y %H:%M:%S GMT')}")
    if cookie.HasField("max_age"):
        parts.append(f"max-age={int(cookie.max_age.value)}")
    if cookie.HasField("domain") and cookie.domain.value:
        parts.append(f"domain={cookie.domain.value}")
    path = cookie.path.value if cookie.HasField("path") else "/"
    if path:
        parts.append(f"path={path}")
    if cookie.HasField("secure") and cookie.secure.value:
        parts.append("secure")
    if cookie.same_site in _SAME_SITE:
        parts.append(f"samesite={_SAME_SITE[cookie.same_site]}")
    if cookie.HasField("http_only") and cookie.http_only.value:
        parts.append("httponly")
    return "; ".join(parts)


def _body(data: Any) -> tuple[bytes, str | None]:
    """TypedData.ToObject, then the formatter that writes it: bytes as they are, text as UTF-8."""
    kind = data.WhichOneof("data")
    if kind in ("bytes", "stream"):
        return getattr(data, kind), None
    if kind == "string":
        return data.string.encode(), "text/plain; charset=utf-8"
    if kind == "json":
        return json.dumps(json.loads(data.json), separators=(",", ":")).encode(), "text/plain; charset=utf-8"
    if kind in ("int", "double"):
        return str(getattr(data, kind)).encode(), "text/plain; charset=utf-8"
    return b"", "text/plain; charset=utf-8"


def to_web_response(value: Any | None) -> web.Response:
    """The invocation's return value as the host writes it to the caller."""
    if value is None or value.WhichOneof("data") != "http":
        body, content_type = _body(value) if value is not None else (b"", "text/plain; charset=utf-8")
        response = web.Response(status=200, body=body)
        if content_type:
            response.headers["Content-Type"] = content_type
        return response
    http = value.http
    try:
        status = int(http.status_code)
    except ValueError:
        status = 200
    body, default_type = _body(http.body)
    response = web.Response(status=status, body=body)
    for name, header in http.headers.items():
        if name.lower() == "content-type":
            response.headers["Content-Type"] = header
        elif name.lower() not in _HOP_BY_HOP:
            response.headers[name] = header
    if "Content-Type" not in response.headers and default_type:
        response.headers["Content-Type"] = default_type
    for cookie in http.cookies:
        response.headers.add("Set-Cookie", _set_cookie(cookie))
    return response
