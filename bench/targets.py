"""The issue's targets, checked against a run's results (ratios and counts, not absolute numbers)."""

from __future__ import annotations

HANDLER_REFRESH_RATIO = 0.8
WRITE_VERBS = ("insert", "upsert", "update", "delete", "batch", "create")
E2E_REFRESH_RATIO = 0.5
IMPORT_OVERHEAD_MS = 100.0

# A target this design does not meet, and why; reported as NOT MET (known), never hidden.
KNOWN_GAPS = {
    "first issue, second reverse lookup": (
        "Entra users keyed by sub need a second reverse lookup, the Graph row (o-<tid,oid> -> user): "
        "Microsoft Graph events name users by object id, and a sub-keyed mapping cannot be derived "
        "from one. With AUTH_USER_CLAIM=oid (recommended for Entra-only apps) the event names the "
        "mapping itself and the row is not written. It goes out with the mapping insert (no extra "
        "round trip); a partition of its own, so no entity-group transaction can carry it."
    ),
}

# What each Table write of a first issue is for (row kinds from bench/counting.py).
FIRST_ISSUE_WRITES = {
    "insert mapping": "insert",
    "upsert owner": "reverse lookup",  # ACS id -> user: admin routes and events
    "upsert retention": "last use",  # the first day's row of the last-use index cleanup scans
}


def _status(met: bool, name: str) -> str:
    if met:
        return "PASS"
    return "NOT MET (known)" if name in KNOWN_GAPS else "FAIL"


def evaluate(results: dict) -> list[dict]:
    targets: list[dict] = []

    def add(name: str, value, goal: str, met: bool, key: str | None = None) -> None:
        entry = {
            "target": name,
            "value": value,
            "goal": goal,
            "met": bool(met),
            "status": _status(met, key or name),
        }
        if not met and (key or name) in KNOWN_GAPS:
            entry["reason"] = KNOWN_GAPS[key or name]
        targets.append(entry)

    refresh = results.get("throughput", {}).get("refresh", {})
    for c in ("16", "64"):
        if c in refresh:
            ratio = refresh[c]["handler"]["ratio_to_floor"]
            add(
                f"handler-level refresh throughput / floor, c={c}",
                ratio,
                f">= {HANDLER_REFRESH_RATIO}",
                ratio >= HANDLER_REFRESH_RATIO,
            )
    for c in ("16", "64"):
        if c in refresh and "handler_new_bearer" in refresh[c]:
            ratio = refresh[c]["handler_new_bearer"]["ratio_to_floor"]
            targets.append(
                {
                    "target": f"(info) handler-level refresh / floor, a new bearer each request, c={c}",
                    "value": ratio,
                    "goal": "reported: every request pays a full JWT validation",
                    "met": True,
                    "status": "INFO",
                }
            )
    if "16" in refresh:
        ratio = refresh["16"]["e2e"]["ratio_to_floor"]
        add(
            "end-to-end refresh throughput / floor, c=16",
            ratio,
            f">= {E2E_REFRESH_RATIO}",
            ratio >= E2E_REFRESH_RATIO,
        )

    calls = results.get("calls", {})

    def shape(op: str) -> str:
        c = calls[op]
        return f"{c['table_reads']:g} read + {c['acs_calls']:g} ACS + {c['table_writes']:g} write"

    for op in ("refresh", "repeated issue"):
        if op in calls:
            c = calls[op]
            add(
                f"{op} calls",
                shape(op),
                "1 read + 1 ACS + 0 write",
                c["table_reads"] == 1 and c["acs_calls"] == 1 and c["table_writes"] == 0,
            )
    if "refresh, first of a new day" in calls:
        c = calls["refresh, first of a new day"]
        add(
            "refresh calls, first of a day",
            shape("refresh, first of a new day"),
            "1 read + 1 ACS + <= 1 write (last use)",
            c["table_reads"] == 1 and c["acs_calls"] == 1 and c["table_writes"] <= 1,
        )
    for op in ("first issue, no oid/tid", "first issue, AUTH_USER_CLAIM=oid", "first issue"):
        if op in calls:
            c = calls[op]
            writes = {k: v for k, v in c["table"].items() if k.split(" ")[0] in WRITE_VERBS}
            labels = FIRST_ISSUE_WRITES | {"upsert graph": "second reverse lookup"}
            purposes = [f"{labels.get(k, k)} ({k.split(' ', 1)[1]})" for k in writes]
            # Exactly one mapping insert and one reverse lookup (a count that lost one is no success).
            expected = writes.get("insert mapping") == 1 and writes.get("upsert owner") == 1
            expected = expected and writes.get("upsert retention", 0) <= 1
            extra = sorted(set(writes) - set(FIRST_ISSUE_WRITES))
            add(
                f"{op} calls",
                f"{shape(op)}: " + ", ".join(purposes),
                "<= 1 read + 1 ACS + 1 insert + the reverse-lookup insert (+ <= 1 last-use write "
                "per user per day, as for refresh)",
                c["table_reads"] <= 1 and c["acs_calls"] <= 1 and expected and not extra,
                key="first issue, second reverse lookup" if extra == ["upsert graph"] else None,
            )

    index = results.get("cold_start", {}).get("index")
    if index:
        add(
            "import function_app, over its dependencies",
            f"{index['overhead_ms']:g} ms",
            f"<= {IMPORT_OVERHEAD_MS:g} ms",
            index["overhead_ms"] <= IMPORT_OVERHEAD_MS,
        )

    per_worker = results.get("per_worker", {})
    if per_worker.get("jwks_fetches") is not None:
        add(
            "JWKS fetched once per worker",
            f"{per_worker['jwks_fetches']} for {per_worker['handler_requests']} requests",
            "1",
            per_worker["jwks_fetches"] == 1,
        )
    return targets


def failed(targets: list[dict]) -> list[dict]:
    return [t for t in targets if t["status"] == "FAIL"]
