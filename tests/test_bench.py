"""The benchmark code runs end to end, in a tiny configuration, so that it cannot rot.

No timing is asserted: the numbers of a run this small mean nothing. What is checked is that every
part runs and reports, and the backend calls per operation, which are counts, not timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chart, report, targets
from bench.run import Config, run
from bench.storm import schedule
from devstack.layout import ISSUER_KEY_FILE


@pytest.mark.slow
def test_bench_runs_end_to_end_in_a_quick_configuration(stack, emulator, tmp_path):
    config = Config.quick_config()
    results = run(
        stack.env,
        stack.state_dir / ISSUER_KEY_FILE,
        Path(stack["ca_bundle"]).parent,
        config,
        stack_pid=stack.process.pid,
        log=lambda _line: None,
    )
    results["targets"] = targets.evaluate(results)
    json.dumps(results)  # what bench/results.json gets

    for operation in ("refresh", "first_issue"):
        for c in config.concurrency:
            for mode in ("floor", "handler", "e2e"):
                measured = results["throughput"][operation][str(c)][mode]
                assert measured["errors"] == 0, measured.get("first_error")
                assert measured["throughput"] > 0

    calls = results["calls"]
    for operation in ("refresh", "repeated issue"):
        assert (calls[operation]["table_reads"], calls[operation]["acs_calls"]) == (1, 1), calls[operation]
        assert calls[operation]["table_writes"] == 0, calls[operation]
    assert calls["refresh, first of a new day"]["table_writes"] == 1
    assert calls["first issue"]["acs"] == {"createIdentity": 1}
    # The mapping insert, and one transaction filing the index rows. Keyed by object id, an Entra
    # user needs no Graph lookup row; keyed by sub, one; a user with no oid/tid, none.
    index = "batch [upsert owner, upsert retention, upsert graph]"
    assert calls["first issue"]["table"]["insert mapping"] == 1
    assert calls["first issue"]["table"]["update mapping"] == 1  # marked checked for events (#16)
    assert calls["first issue"]["table"][index] == 1, calls["first issue"]
    assert (calls["first issue"]["table_writes"], calls["first issue"]["table_entities_written"]) == (3, 5)
    for op in ("first issue, AUTH_USER_CLAIM=oid", "first issue, no oid/tid"):
        assert calls[op]["table"]["batch [upsert owner, upsert retention]"] == 1, calls[op]
        assert (calls[op]["table_writes"], calls[op]["table_entities_written"]) == (3, 4), calls[op]
    # Every Table answer is recorded: no count hides a retried failure.
    assert calls["refresh"]["table_statuses"] == {"read mapping 200": 1}, calls["refresh"]
    assert calls["first issue"]["table_statuses"]["read mapping 404"] == 1  # the miss
    assert all(int(k.rsplit(" ", 1)[1]) < 500 for c in calls.values() for k in c.get("table_statuses", {}))
    status = {t["target"]: t["status"] for t in results["targets"]}
    for op in ("first issue", "first issue, AUTH_USER_CLAIM=oid", "first issue, no oid/tid"):
        assert status[f"{op} calls"] == "PASS", results["targets"]
    assert results["per_worker"]["jwks_fetches"] == 1

    filing = results["filing"]
    assert (filing["transaction"]["requests"], filing["single upserts"]["requests"]) == (1, 3)
    assert filing["transaction"]["cpu_ms_per_filing"] > 0 and filing["single upserts"]["throughput"] > 0

    cold = results["cold_start"]
    assert cold["index"]["total_ms"] > 0 and "azure.functions" in cold["index"]["dependencies"]
    assert {t["status"] for t in results["targets"]} <= {"PASS", "FAIL", "INFO"}

    # The token storm ran both columns, every request counted once, its ACS calls counted.
    storm = results["storm"]
    assert set(storm["columns"]) == {"service", "baseline"}
    for column in storm["columns"].values():
        assert sum(column["answers"].values()) == column["requests"] == len(schedule(config.storm))
        assert sum(column["routes"].values()) == column["requests"]
        assert column["acs_calls_total"] > 0 and column["acs_issue_calls"] > 0
    storm_status = [t["status"] for t in results["targets"] if "storm:" in t["target"]]
    assert len(storm_status) == 3
    assert set(storm_status) <= {"PASS", "FAIL"}

    assert "Refresh" in report.render(results) and "Token storm" in report.render(results)
    png = chart.draw(results, tmp_path / "throughput.png")
    assert png.read_bytes().startswith(b"\x89PNG")
