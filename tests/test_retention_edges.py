"""The edges a second attack on retention (issue 16) found, each replayed as it was found.

A block that lands after the timer finished its work, a first issue that loses its race to an
unchecked mapping, a use noted while the timer asks ACS whether its delete landed, and the cost of
the dry run. Same tools as tests/test_retention.py: `Pause` holds one real call, clocks move.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import jwt
import pytest
from azure.core.exceptions import ServiceResponseError

import function_app
from shared import cleanup as cleanup_module
from shared.compose import services
from shared.errors import Unavailable
from shared.store.keys import IDENTITY_ROW, user_key
from tests.service_fixtures import configure
from tests.service_helpers import body_of, drain_cleanup, request
from tests.test_retention import (
    LATER,
    Pause,
    _deliver,
    _mapping,
    _post,
    _preview,
    _run_at,
    _stale_user,
    _user_deleted,
)


async def _answer_lost(*_args, **_kwargs):
    """ACS's delete whose answer never came (azure-core: ServiceResponseError)."""
    raise ServiceResponseError(message="the connection dropped before ACS answered")


class _HeldBlock:
    """Holds the write of a revoke's block on the mapping (the merge of pending="revoke")."""

    def __init__(self, monkeypatch, table) -> None:
        self.reached, self._go = asyncio.Event(), asyncio.Event()
        real = table.merge

        async def merge(partition, row, values, **kwargs):
            if values.get("pending") == "revoke" and not self._go.is_set():
                self.reached.set()
                await self._go.wait()
            return await real(partition, row, values, **kwargs)

        monkeypatch.setattr(table, "merge", merge)

    async def wait(self) -> None:
        await asyncio.wait_for(self.reached.wait(), 30)

    def release(self) -> None:
        self._go.set()


async def _queued(key: str, op: str) -> list:
    return [w async for w in services().store.pending.pending_work() if w.user_key == key and w.op == op]


async def test_a_revoke_whose_block_lands_after_the_timer_ran_is_completed_not_stuck(
    service, emulator, monkeypatch
):
    """A revoke on a claimed identity, ACS throttled: its work is queued, its block is slow. The
    timer, 31 s on, revokes; before, it finished the work, and the block landing after left the
    user refused (409 revoke_pending) with no work queued, for good. Now the work waits for the
    block (BLOCK_GRACE), and the next run lifts it."""
    await drain_cleanup()
    await _stale_user(service, "late-block")
    await services().cleanup.run(ignore_backoff=True)  # retention's claim
    assert (await _mapping(service, "late-block")).pending == "retire"
    store = services().store
    slow_block = _HeldBlock(monkeypatch, store.table)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    try:
        revoke = asyncio.create_task(
            function_app.revoke_tokens(request("POST", "token/revoke", token=service.token("late-block")))
        )
        await slow_block.wait()  # queued; the block not written yet
    finally:
        emulator.faults(throttleRate=0.0, retryAfterSeconds=1)
    cleanup = services().cleanup
    real_clock = cleanup.clock
    cleanup.clock = lambda: real_clock() + dt.timedelta(seconds=31)  # past FIRST_RETRY
    try:
        report = await cleanup.run()
    finally:
        cleanup.clock = real_clock
    assert report.get("waiting_for_block") == 1, report
    slow_block.release()
    assert (await revoke).status_code == 202
    key = user_key(service.stack["issuer"], "late-block")
    assert (await store.identities.get(key)).pending == "revoke"

    report = await _run_at(cleanup_module.LEASE + dt.timedelta(seconds=1))
    assert report.get("revoked") == 1, report
    assert (await _post(service, "token/refresh", "late-block")).status_code == 200
    assert not await _queued(key, "revoke")


async def test_a_blocked_user_whose_work_is_gone_gets_it_queued_again(service, emulator):
    """However a block outlived its work (the test above, or a fault not yet found), a refused
    request queues the work again under the block's id, and the timer completes it."""
    await drain_cleanup()
    assert (await _post(service, "token", "orphan-block")).status_code == 200
    store = services().store
    key = user_key(service.stack["issuer"], "orphan-block")
    record = await store.identities.get(key)
    await store.identities.mark_pending(record, "revoke", dt.datetime.now(dt.UTC), dt.timedelta(0))
    for work in await _queued(key, "revoke"):
        await store.pending.finish(work)  # the work is gone, the block stays
    blocked = await store.identities.get(key)
    assert blocked.pending == "revoke" and not await _queued(key, "revoke")

    refused = await _post(service, "token/refresh", "orphan-block")
    assert refused.status_code == 409 and body_of(refused)["code"] == "revoke_pending"
    [requeued] = await _queued(key, "revoke")
    assert requeued.pending_id == blocked.pending_id
    report = await _run_at(cleanup_module.BLOCK_GRACE)
    assert report.get("revoked") == 1, report
    assert (await _post(service, "token/refresh", "orphan-block")).status_code == 200


async def test_a_first_issue_losing_its_race_checks_the_winners_mapping_for_events(
    service, emulator, monkeypatch
):
    """Two first issues of one user with a bearer older than a UserDeleted event that arrives
    between their ACS creates and their inserts. The winner's mapping is in, not yet checked;
    before, the loser was handed a token on it. Now the loser checks it as any request does."""
    # Two first issues racing to insert are two workers' (one worker's wait for each other).
    await configure(monkeypatch, service.stack, managed_identity=False, STORM_PROTECTION="off")
    bearer = service.token("lost-race-event", now=time.time() - 60)
    claims = jwt.decode(bearer, options={"verify_signature": False})
    store, tokens = services().store, services().tokens
    real_insert = store.table.insert
    gates: list[tuple[asyncio.Event, asyncio.Event]] = []

    async def gated(entity):
        if entity["RowKey"] != IDENTITY_ROW:
            return await real_insert(entity)
        gate = (asyncio.Event(), asyncio.Event())
        gates.append(gate)
        gate[0].set()
        await gate[1].wait()
        return await real_insert(entity)

    monkeypatch.setattr(store.table, "insert", gated)  # the mapping insert
    winner = asyncio.create_task(_post(service, "token", "lost-race-event", bearer=bearer))
    while len(gates) < 1:  # noqa: ASYNC110 - the gate list is the signal
        await asyncio.sleep(0.01)
    loser = asyncio.create_task(_post(service, "token", "lost-race-event", bearer=bearer))
    while len(gates) < 2:  # noqa: ASYNC110 - the gate list is the signal
        await asyncio.sleep(0.01)
    assert body_of(await _deliver(_user_deleted(claims)))["results"]["unknown_user"] == 1
    recheck = Pause(monkeypatch, tokens.sessions, "recheck")
    gates[0][1].set()
    await recheck.wait()  # the winner's mapping is in, unchecked
    gates[1][1].set()
    lost = await loser
    recheck.release()
    won = await winner
    for response in (lost, won):
        assert response.status_code == 401 and body_of(response)["code"] == "session_ended", response
    assert (await _mapping(service, "lost-race-event")) is None


async def test_a_use_noted_while_the_timer_asks_acs_saves_the_identity(
    service, acs_calls, emulator, monkeypatch
):
    """Retention committed and its delete got no answer. The next run asks ACS whether the identity
    is still there; meanwhile the user is refused (409) and their use noted. Before, the run judged
    on the mapping it read before asking, and deleted. Now it reads again: the use wins."""
    await drain_cleanup()
    stale = await _stale_user(service, "probe-window")
    await services().cleanup.run(ignore_backoff=True)
    with acs_calls.replacing(delete_user=_answer_lost):
        assert (await _run_at(LATER))["retry_retire"] == 1
    probe = Pause(monkeypatch, acs_calls, "get_token")  # the timer asks ACS: is it still there?
    run = asyncio.create_task(_run_at(LATER + cleanup_module.MAX_BACKOFF))
    await probe.wait()
    blocked = await _post(service, "token/refresh", "probe-window")
    assert blocked.status_code == 409 and body_of(blocked)["code"] == "delete_pending"
    probe.release()
    report = await run
    assert report.get("retention_deleted", 0) == 0, report
    assert emulator.verify(stale["token"])["valid"]
    assert (await _post(service, "token/refresh", "probe-window")).status_code == 200


async def test_the_probe_asks_acs_once_without_backing_off(service, emulator):
    """Whether an identity is still there is asked once: a throttled ACS answers the run at once
    (the run moves on), instead of holding it in azure-core's Retry-After waits."""
    gateway = services().cleanup.acs
    options = cleanup_module.PROBE_OPTIONS
    created = body_of(await _post(service, "token", "probe-throttled"))
    assert await gateway.exists(created["communicationUserId"], **options)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    try:
        before = emulator.stats()["calls"].get("issueAccessToken", 0)
        with pytest.raises(Unavailable) as refused:
            await gateway.exists(created["communicationUserId"], **options)
        assert refused.value.code == "acs_throttled"
        assert emulator.stats()["calls"]["issueAccessToken"] == before + 1
    finally:
        emulator.faults(throttleRate=0.0, retryAfterSeconds=1)
    with pytest.raises(Unavailable):  # ACS asked for 30 s: the worker does not ask before then
        await gateway.exists(created["communicationUserId"], **options)
    assert emulator.stats()["calls"]["issueAccessToken"] == before + 1
    real = gateway.throttle.clock
    gateway.throttle.clock = lambda: real() + 31
    await gateway.delete(created["communicationUserId"])
    assert not await gateway.exists(created["communicationUserId"], **options)


async def test_the_dry_run_reads_one_mapping_a_row_it_looks_at(service, monkeypatch):
    """Before, it read the mapping of every queued retirement whatever the limit."""
    await drain_cleanup()
    for i in range(6):
        await _stale_user(service, f"preview-cost-{i}")
    await services().cleanup.run(ignore_backoff=True)  # claims all six
    store = services().store
    reads = Pause(monkeypatch, store.identities, "get", after=True)
    reads.release()
    response = await _preview(service, limit="1")
    listed = body_of(response)
    assert len(listed["identities"]) == 1 and listed["truncated"] is True
    assert reads.calls == 1


async def test_the_dry_run_lists_a_committed_retirement_as_deleting(service, acs_calls):
    await drain_cleanup()
    stale = await _stale_user(service, "preview-deleting")
    await services().cleanup.run(ignore_backoff=True)
    with acs_calls.replacing(delete_user=_answer_lost):
        assert (await _run_at(LATER))["retry_retire"] == 1
    assert (await _mapping(service, "preview-deleting")).pending == "retiring"
    states = {
        item["communicationUserId"]: item["state"] for item in body_of(await _preview(service))["identities"]
    }
    assert states[stale["communicationUserId"]] == "deleting"
