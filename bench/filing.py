"""What a first issue's index filing costs as one entity-group transaction, against the same rows
written as concurrent single upserts (what the service did before).

The service files an identity's index rows (owner, retention and, for Entra users keyed by `sub`,
Graph) in one transaction: one request, all or nothing. azure-core builds and parses the
transaction's multipart body with the standard library's `email` package, which costs CPU; this
measures how much, directly with the aio SDK, in rounds that alternate the two ways.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from .load import closed_loop

WAYS = ("transaction", "single upserts")


def _rows(partition: str, i: int) -> list[dict]:
    # The shape of the service's index rows (shared/store.py), in a partition of the bench's own.
    user = f"u-{i:06d}{'x' * 36}"
    return [
        {"PartitionKey": partition, "RowKey": f"c-{i:06d}{'y' * 37}", "communicationUserId": f"8:acs:{i}",
         "userKey": user, "createdAt": "2026-11-25T00:00:00Z"},
        {"PartitionKey": partition, "RowKey": f"d-2026-11-25.{user}.{i:06d}", "userKey": user,
         "communicationUserId": f"8:acs:{i}", "graphRow": f"o-{i:06d}.{user}"},
        {"PartitionKey": partition, "RowKey": f"o-{i:06d}.{user}", "userKey": user},
    ]  # fmt: skip


async def _file(table: TableClient, way: str, rows: list[dict]) -> None:
    if way == "transaction":
        await table.submit_transaction([("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows])
    else:
        await asyncio.gather(*(table.upsert_entity(row, mode=UpdateMode.REPLACE) for row in rows))


async def filing_cost(table: TableClient, *, ops: int, concurrency: int, rounds: int) -> dict:
    """CPU of this process and throughput per filing, median over rounds, for each way."""
    partition = f"bench-filing-{uuid.uuid4().hex[:8]}"
    measured: dict[str, dict[str, list[float]]] = {way: {"cpu_ms": [], "per_s": []} for way in WAYS}
    try:
        for n in range(rounds + 1):  # round 0 warms both ways up
            for way in WAYS if n % 2 else reversed(WAYS):
                base = (2 * n + WAYS.index(way)) * ops

                def op(i: int, way=way, base=base):
                    return _file(table, way, _rows(partition, base + i))

                cpu = time.process_time()
                run = await closed_loop(op, ops, concurrency)
                if run.errors:
                    raise RuntimeError(f"filing by {way} failed: {run.first_error}")
                if n:
                    measured[way]["cpu_ms"].append((time.process_time() - cpu) * 1000 / ops)
                    measured[way]["per_s"].append(ops / run.elapsed)
    finally:
        await _drop(table, partition)
    out = {
        way: {
            "requests": 1 if way == "transaction" else len(_rows(partition, 0)),
            "cpu_ms_per_filing": round(statistics.median(m["cpu_ms"]), 2),
            "throughput": round(statistics.median(m["per_s"]), 1),
        }
        for way, m in measured.items()
    }
    out["concurrency"] = concurrency
    out["extra_cpu_ms_of_the_transaction"] = round(
        out["transaction"]["cpu_ms_per_filing"] - out["single upserts"]["cpu_ms_per_filing"], 2
    )
    return out


async def _drop(table: TableClient, partition: str) -> None:
    rows = table.query_entities("PartitionKey eq @p", parameters={"p": partition}, select=["RowKey"])
    keys = [row["RowKey"] async for row in rows]
    for start in range(0, len(keys), 100):  # a transaction carries at most 100 operations
        chunk = keys[start : start + 100]
        await table.submit_transaction([("delete", {"PartitionKey": partition, "RowKey": k}) for k in chunk])
