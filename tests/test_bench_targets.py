"""How `make bench` judges a first issue's Table writes: pure logic over counted calls."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import targets
from bench.counting import summarize

# Did an event end the user's sessions: before ACS is asked (issue #15), and after the mapping
# insert, for an event that came while the identity was being created (issue #16).
ENDED = "query ended sessions"


CHECKED = "update mapping"  # issue #16: the new mapping marked checked for events, once it looked


def _verdict(op: str, table: dict[str, int], acs: int = 1, ended: int = 2, checked: int = 1) -> str:
    counted = Counter({ENDED: ended, **table})
    if checked:
        counted[CHECKED] = checked
    calls = summarize(counted, Counter({"createIdentity": acs}), 1)
    [verdict] = [t for t in targets.evaluate({"calls": {op: calls}}) if t["target"] == f"{op} calls"]
    return verdict["status"]


def _first_issue(table: dict[str, int], acs: int = 1, ended: int = 2, checked: int = 1) -> str:
    return _verdict("first issue", table, acs, ended, checked)


INDEX = "batch [upsert owner, upsert retention, upsert graph]"
WITHOUT_GRAPH = "batch [upsert owner, upsert retention]"


def test_the_mapping_insert_and_one_index_transaction_pass():
    assert _first_issue({"read mapping": 1, "insert mapping": 1, INDEX: 1}) == "PASS"
    for op in ("first issue, AUTH_USER_CLAIM=oid", "first issue, no oid/tid"):
        assert _verdict(op, {"read mapping": 1, "insert mapping": 1, WITHOUT_GRAPH: 1}) == "PASS"


@pytest.mark.parametrize(
    "table",
    [
        # The same rows written one request each: three writes beside the mapping.
        {"read mapping": 1, "insert mapping": 1, "upsert owner": 1, "upsert retention": 1, "upsert graph": 1},
        # A transaction that lost a row (a broken lookup), carried one twice, or something else.
        {"read mapping": 1, "insert mapping": 1, "batch [upsert retention, upsert graph]": 1},
        {"read mapping": 1, "insert mapping": 1, WITHOUT_GRAPH: 1},
        {"read mapping": 1, "insert mapping": 1, "batch [upsert owner, upsert graph]": 1},
        {"read mapping": 1, "insert mapping": 1, "batch [upsert owner, upsert owner, upsert retention]": 1},
        {"read mapping": 1, "insert mapping": 1, INDEX[:-1] + ", upsert pending]": 1},
        # Two transactions, or none beside the mapping, or no mapping insert.
        {"read mapping": 1, "insert mapping": 1, INDEX: 2},
        {"read mapping": 1, "insert mapping": 1},
        {"read mapping": 1, INDEX: 1},
        # A second read.
        {"read mapping": 2, "insert mapping": 1, INDEX: 1},
    ],
)
def test_anything_else_fails(table):
    assert _first_issue(table) == "FAIL"


def test_a_first_issue_that_does_not_check_for_ended_sessions_fails():
    for ended in (0, 1, 3):
        assert _first_issue({"read mapping": 1, "insert mapping": 1, INDEX: 1}, ended=ended) == "FAIL"


def test_a_first_issue_that_does_not_mark_its_mapping_checked_once_fails():
    for checked in (0, 2):
        assert _first_issue({"read mapping": 1, "insert mapping": 1, INDEX: 1}, checked=checked) == "FAIL"


def test_a_graph_row_the_configuration_does_not_need_fails():
    for op in ("first issue, AUTH_USER_CLAIM=oid", "first issue, no oid/tid"):
        assert _verdict(op, {"read mapping": 1, "insert mapping": 1, INDEX: 1}) == "FAIL"


def test_a_second_acs_call_or_none_fails():
    assert _first_issue({"read mapping": 1, "insert mapping": 1, INDEX: 1}, acs=2) == "FAIL"
    assert _first_issue({"read mapping": 1, "insert mapping": 1, INDEX: 1}, acs=0) == "FAIL"


def test_a_count_the_run_did_not_make_fails():
    calls = summarize(
        Counter({"read mapping": 1, ENDED: 2, "insert mapping": 1, CHECKED: 1, INDEX: 1}),
        Counter({"createIdentity": 1}),
        1,
    )
    verdicts = {t["target"]: t["status"] for t in targets.evaluate({"calls": {"first issue": calls}})}
    assert verdicts["first issue calls"] == "PASS"
    assert verdicts["refresh calls"] == verdicts["first issue, no oid/tid calls"] == "FAIL"


def test_entities_written_count_each_row_of_a_transaction():
    calls = summarize(Counter({"insert mapping": 2, INDEX: 2, "read mapping": 2}), Counter(), 2)
    assert (calls["table_writes"], calls["table_entities_written"], calls["table_reads"]) == (2, 4, 1)


def _storm(answers: dict, acs_429: int, acs_calls: int, issue_calls: int) -> dict:
    ok = answers.get("200", 0)
    column = {
        "requests": sum(answers.values()),
        "answers": {
            "200": ok,
            "429 with Retry-After": answers.get("429 with Retry-After", 0),
            "429 without Retry-After": answers.get("429 without Retry-After", 0),
            "other": answers.get("other", 0),
        },
        "acs_429_total": acs_429,
        "acs_calls_total": acs_calls,
        "acs_429_share": acs_429 / acs_calls,
        "acs_issue_calls": issue_calls,
        "tokens_per_issue_call": round(ok / issue_calls, 2),
    }
    return {"columns": {"service": column, "baseline": column}}


PROTECTED = _storm({"200": 900, "429 with Retry-After": 600}, acs_429=1, acs_calls=150, issue_calls=150)
UNPROTECTED = _storm({"200": 150, "other": 1350}, acs_429=800, acs_calls=1000, issue_calls=1000)


def test_storm_targets_pass_or_fail():
    assert {t["status"] for t in targets.storm_targets(PROTECTED)} == {"PASS"}
    assert {t["status"] for t in targets.storm_targets(UNPROTECTED)} == {"FAIL"}
    # Each target on its own: a 429 without Retry-After, 2% ACS 429s, fewer than 3 tokens per issue.
    edges = [
        _storm({"200": 900, "429 without Retry-After": 1}, acs_429=0, acs_calls=150, issue_calls=150),
        _storm({"200": 900}, acs_429=3, acs_calls=150, issue_calls=150),
        _storm({"200": 449}, acs_429=0, acs_calls=150, issue_calls=150),
    ]
    for failing, storm in enumerate(edges):
        assert len([t for t in targets.evaluate({"storm": storm}) if "storm:" in t["target"]]) == 3
        statuses = [t["status"] for t in targets.storm_targets(storm)]
        assert statuses == ["PASS"] * failing + ["FAIL"] + ["PASS"] * (2 - failing), statuses


def test_the_storm_schedule_is_open_loop_at_ten_times_the_issue_limit():
    from bench.storm import StormConfig, schedule

    config = StormConfig()
    plan = schedule(config)
    assert config.rate == 10 * config.issue_limit / config.window_seconds
    assert len(plan) == round(config.rate * config.seconds)
    assert plan == schedule(config) and plan == sorted(plan)  # seeded: both columns get the same
    assert all(0 <= at <= config.seconds for at, _user in plan)
    assert {user for _at, user in plan} == set(range(config.users))
    # Reconnect waves: half the pool at one instant, every half window.
    at_once = Counter(at for at, _user in plan)
    waves = [at for at, n in at_once.items() if n > 1]
    assert len(waves) == config.seconds / (config.window_seconds / 2)
    assert all(at_once[at] == config.wave_fraction * config.users for at in waves)
    assert config.max_in_flight >= config.rate * config.client_timeout
