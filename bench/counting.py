"""Backend calls per operation, counted from outside the service.

ACS: the emulator's own call counters (`/_emulator/stats`). Table Storage: a counting proxy in front
of Azurite, the service pointed at it like any Table endpoint. The proxy terminates TLS with the
stack's server certificate and forwards each request unchanged (Shared Key signatures cover the
path, not the port; bearer tokens are for https://storage.azure.com), so the service sees Azurite.
"""

from __future__ import annotations

import json
import re
import ssl
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from devstack.ca import TlsFiles

_HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_POINT = re.compile(r"\(PartitionKey='(?P<pk>[^']*)',\s*RowKey='(?P<rk>[^']*)'\)$")
_PART_REQUEST = re.compile(rb"^(?P<method>GET|POST|PUT|PATCH|MERGE|DELETE) (?P<url>\S+) HTTP/1\.1\r?$", re.M)
ROW_KINDS = {
    "u-": "mapping",
    "pending": "pending",
    "events": "events",
}
INDEX_ROW_KINDS = {"c-": "owner", "o-": "graph", "d-": "retention"}  # in the "index" partition
WRITES = ("insert", "upsert", "update", "delete", "batch", "create table")


def row_kind(partition_key: str, row_key: str = "") -> str:
    from urllib.parse import unquote

    key, row = unquote(partition_key), unquote(row_key)
    if key == "index":
        return next((kind for prefix, kind in INDEX_ROW_KINDS.items() if row.startswith(prefix)), "index")
    return next((kind for prefix, kind in ROW_KINDS.items() if key.startswith(prefix)), "other")


def classify(method: str, path: str, headers, body: bytes, query: str = "") -> str:
    """'<call> <row kind>', e.g. 'read mapping', 'insert owner', 'create table'; an entity-group
    transaction is one call, named with what it carries: 'batch [upsert owner, upsert retention]'."""
    resource = path.rstrip("/").rsplit("/", 1)[-1]
    if resource.startswith("Tables"):
        return "create table" if method == "POST" else "tables " + method.lower()
    if resource == "$batch":
        return "batch [" + ", ".join(batch_parts(body)) + "]"
    point = _POINT.search(resource)
    if method == "GET":
        if point:
            return f"read {row_kind(point['pk'], point['rk'])}"
        from urllib.parse import unquote

        # shared/store/lookups.py sessions_ended: the index rows of users an event ended (keys.ended_*_row)
        return "query ended sessions" if "'x-u-" in unquote(query) else "query"
    if method == "POST":
        try:
            entity = json.loads(body)
            kind = row_kind(entity.get("PartitionKey", ""), entity.get("RowKey", ""))
        except (ValueError, AttributeError):
            kind = "other"
        return f"insert {kind}"
    kind = row_kind(point["pk"], point["rk"]) if point else "other"
    if method == "DELETE":
        return f"delete {kind}"
    guarded = "if-match" in {k.lower() for k in headers}
    return f"{'update' if guarded else 'upsert'} {kind}"


def batch_operations(call: str) -> list[str] | None:
    """The operations a counted transaction carried ('batch [upsert owner, ...]'), or None."""
    if not (call.startswith("batch [") and call.endswith("]")):
        return None
    return [part.strip() for part in call[len("batch [") : -1].split(",") if part.strip()]


def batch_parts(body: bytes) -> list[str]:
    """The operations inside a $batch body (multipart/mixed, one HTTP request per part)."""
    parts = []
    matches = list(_PART_REQUEST.finditer(body))
    for n, match in enumerate(matches):
        end = matches[n + 1].start() if n + 1 < len(matches) else len(body)
        head, _, payload = body[match.end() : end].partition(b"\r\n\r\n")
        headers = [line.split(b":", 1)[0].decode().strip() for line in head.splitlines() if b":" in line]
        path = match["url"].decode().split("?", 1)[0]
        payload = payload.split(b"\r\n--", 1)[0]
        parts.append(classify(match["method"].decode(), path, headers, payload))
    return parts


class TableCountingProxy:
    """https://127.0.0.1:<port>/<account> -> Azurite's Table endpoint, counting every request."""

    def __init__(self, target_endpoint: str, tls_dir: Path) -> None:
        self.target = target_endpoint.rstrip("/").rsplit("/", 1)[0]  # scheme://host:port
        self.account = target_endpoint.rstrip("/").rsplit("/", 1)[1]
        self.tls_dir = tls_dir
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()  # '<call> <status>', to spot retried failures

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/{self.account}"

    async def __aenter__(self) -> TableCountingProxy:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls = TlsFiles.at(self.tls_dir)
        context.load_cert_chain(tls.server_cert, tls.server_key)
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = classify(request.method, request.path, request.headers, body, query=request.query_string)
        self.calls[call] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self.session.request(
            request.method, self.target + request.raw_path, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            self.statuses[f"{call} {answer.status}"] += 1
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=answer.status, headers=out, body=payload)


class AcsCounter:
    """The emulator's per-operation call counters."""

    def __init__(self, hooks: str) -> None:
        self.hooks = hooks

    async def calls(self, session: aiohttp.ClientSession) -> Counter[str]:
        async with session.get(self.hooks + "stats") as response:
            response.raise_for_status()
            return Counter((await response.json())["calls"])


def summarize(table: Counter[str], acs: Counter[str], operations: int) -> dict:
    """Calls per operation, averaged over `operations` identical operations. Table calls are
    requests (an entity-group transaction is one); `table_entities_written` counts what they wrote."""
    per_op = {k: round(v / operations, 2) for k, v in sorted(table.items()) if v}
    written = 0
    for call, count in table.items():
        if (carried := batch_operations(call)) is not None:
            written += count * len(carried)
        elif call.startswith(WRITES) and call != "create table":
            written += count
    return {
        "table_reads": round(
            sum(v for k, v in table.items() if k.startswith(("read", "query"))) / operations, 2
        ),
        "table_writes": round(sum(v for k, v in table.items() if k.startswith(WRITES)) / operations, 2),
        "table_entities_written": round(written / operations, 2),
        "acs_calls": round(sum(acs.values()) / operations, 2),
        "table": per_op,
        "acs": {k: round(v / operations, 2) for k, v in sorted(acs.items()) if v},
    }
