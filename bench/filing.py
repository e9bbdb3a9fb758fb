"""What a first issue's index filing costs as one entity-group transaction, against the same rows
written as concurrent single upserts.

The service files an identity's index rows (owner, retention and, for Entra users keyed by `sub`,
Graph) in one transaction: one request, all or nothing. azure-core builds and parses the
transaction's multipart body with the standard library's `email` package, which costs CPU; this
measures how much, directly with the aio SDK, in rounds that alternate the two ways. The rows are
the store's own (`Identities.index_rows`), moved to a partition of the bench's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import statistics
import time
import uuid

from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared.store import keys
from shared.store.identities import Identities
from shared.store.record import IdentityRecord
from shared.store.stores import Stores

from .load import closed_loop

log = logging.getLogger("bench.filing")
WAYS = ("transaction", "single upserts")
NOW = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)


def _rows(identities: Identities, partition: str, i: int) -> list[dict]:
    record = IdentityRecord(
        user_key=keys.user_key("https://login.microsoftonline.com/tenant/v2.0", f"bench-user-{i}"),
        communication_user_id=f"8:acs:00000000-0000-0000-0000-000000000000_{uuid.uuid4()}",
        issuer="https://login.microsoftonline.com/tenant/v2.0",
        subject=f"bench-user-{i}",
        created_at=NOW,
        last_used_on=NOW.date().isoformat(),
        last_issued_at=NOW,
        object_id=str(uuid.uuid4()),
        tenant_id="0f3c8f5e-5a7b-4b0e-9d0a-2d7d6c1b9a11",
    )
    return [{**row, "PartitionKey": partition} for row in identities.index_rows(record)]


async def _file(table: TableClient, way: str, rows: list[dict]) -> None:
    if way == "transaction":
        await table.submit_transaction([("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows])
    else:
        await asyncio.gather(*(table.upsert_entity(row, mode=UpdateMode.REPLACE) for row in rows))


async def filing_cost(table: TableClient, *, ops: int, concurrency: int, rounds: int) -> dict:
    """CPU of this process and throughput per filing, median over rounds, for each way."""
    partition = f"bench-filing-{uuid.uuid4().hex[:8]}"
    identities = Stores(table).identities  # builds rows only: the table is the bench's client
    measured: dict[str, dict[str, list[float]]] = {way: {"cpu_ms": [], "per_s": []} for way in WAYS}
    try:
        for n in range(rounds + 1):  # round 0 warms both ways up
            for way in WAYS if n % 2 else reversed(WAYS):
                base = (2 * n + WAYS.index(way)) * ops
                rows = [_rows(identities, partition, base + i) for i in range(ops)]  # built before timing

                def op(i: int, way=way, rows=rows):
                    return _file(table, way, rows[i])

                cpu = time.process_time()
                run = await closed_loop(op, ops, concurrency)
                if run.errors:
                    raise RuntimeError(f"filing by {way} failed: {run.first_error}")
                if n:
                    measured[way]["cpu_ms"].append((time.process_time() - cpu) * 1000 / ops)
                    measured[way]["per_s"].append(ops / run.elapsed)
    finally:
        try:
            await _drop(table, partition)
        except Exception as err:  # noqa: BLE001 - never hide what failed the measurement
            log.warning("bench filing rows not dropped: %s", type(err).__name__)
    out = {
        way: {
            "requests": 1 if way == "transaction" else len(_rows(identities, partition, 0)),
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
    row_keys = [row["RowKey"] async for row in rows]
    for start in range(0, len(row_keys), 100):  # a transaction carries at most 100 operations
        chunk = row_keys[start : start + 100]
        await table.submit_transaction([("delete", {"PartitionKey": partition, "RowKey": k}) for k in chunk])
