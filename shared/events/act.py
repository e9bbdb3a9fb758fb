"""The Event Grid webhook's events, each acted on once (its HTTP side: shared/http/events.py).

Event Grid delivers at least once. An event is marked done after it is acted on, so a redelivery
of a done event is acknowledged without acting again; one whose handling failed, or was cut off by
a timeout or a crash, has no mark, and Event Grid's retry acts on it. A Graph event names an Entra
user, who may have several identities: each is marked done on its own, so a retry acts only on
those not done yet. Two deliveries of one event at the same moment (Event Grid retries an answer
that takes over 30 s) may both act: a second revoke or delete of the same identity seconds later
changes nothing that matters.

What names an event is what its schema makes unique: CloudEvents `source` + `id` (an id alone is
unique only within its source), the Event Grid schema's `topic` + `id`, and the schema itself; an
identity's mark has a key space of its own (`keys.event_mark`, `keys.identity_mark`). So one
publisher's id never answers for another's event, and no event id can pose as an identity's mark.

A batch (up to 5000 events) is worked through side by side, within a budget. Event Grid waits 30 s
for the answer, then counts the delivery failed and sends the whole batch again, maybe while this
one still runs. So events run concurrently (one at a time per target, in delivery order), no new
work starts after BUDGET_SECONDS or once the delivery has started ACS_CALLS_PER_DELIVERY revocations
and deletions (ACS's limits), work still running at CUTOFF_SECONDS is cancelled, and whatever was
not done is left unmarked and answered 503: Event Grid retries 5xx and redelivers the batch, whose
done events and identities the marks skip. Nothing is lost, and nothing done is done again but
what was cut off in flight (acted on, not yet marked: a revoke or delete repeated, as above).

Microsoft Graph lifecycle notifications (the subscription must be renewed, was removed, or missed
notifications) go to `shared.graph`, once each like the rest. A renewal that failed for a reason a
retry may fix (Graph throttled or down) answers 503, so that Event Grid redelivers (it retries 5xx,
not 4xx); one that needs the operator (no permission) is recorded for /api/health and answered
200, and the cleanup timer keeps trying.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..compose import Services
from ..errors import Code, Unavailable
from ..store import keys
from .model import Action, Delivery, EventTarget, Lifecycle

if TYPE_CHECKING:  # the store loads with the clients: importing function_app stays light
    from ..store.record import IdentityRecord

log = logging.getLogger("acs_token_service.events")

# Event Grid waits 30 s for a webhook's answer ("Event Grid message delivery and retry", Microsoft
# Learn). No event starts after BUDGET_SECONDS; what still runs at CUTOFF_SECONDS (an ACS or Table
# call stuck in its timeouts) is cancelled, like a crash: unmarked, so the retry does it.
BUDGET_SECONDS = 20.0
CUTOFF_SECONDS = 25.0
# Events in flight at once: each waits on a few Table and ACS round trips, so a handful keeps them
# busy; more would queue on the worker's connections and slow its token requests.
CONCURRENCY = 16
# ACS takes 500 revocations and 500 deletions per 30 s per resource, then answers 429. A delivery
# ends within 30 s, so starting at most this many (of both together) keeps one delivery within
# the limits, with room left for users' own revocations; Event Grid's retry brings the rest.
ACS_CALLS_PER_DELIVERY = 400
RETRY_AFTER_SECONDS = 10


class _Budget:
    """What one delivery may still start: events until `stop_at`, and so many ACS calls."""

    def __init__(self, started: float) -> None:
        self.stop_at = started + BUDGET_SECONDS
        self.cut_at = started + CUTOFF_SECONDS
        self.acs_calls = ACS_CALLS_PER_DELIVERY

    def open(self) -> bool:
        return time.monotonic() < self.stop_at

    def take_acs_call(self) -> bool:
        if self.acs_calls <= 0 or not self.open():
            return False
        self.acs_calls -= 1
        return True


class _Deferred(Exception):
    """The budget ran out before this event (or some of its identities) had its turn: it is left
    unmarked, so the redelivery acts on it. `outcomes` are what its done identities came to."""

    def __init__(self, outcomes: list[str] | None = None) -> None:
        super().__init__("deferred")
        self.outcomes = outcomes or []


async def _records_for(clients: Services, action: Action) -> list[IdentityRecord]:
    target, store = action.target, clients.store
    if target.tenant_id and target.object_id:
        return await store.lookups.graph_users(target.tenant_id, target.object_id)
    if target.issuer and target.subject:
        record = await store.identities.get(keys.user_key(target.issuer, target.subject))
        return [record] if record is not None else []
    if target.communication_user_id:
        key = await store.lookups.owner_of(target.communication_user_id)
        record = await store.identities.get(key) if key else None
        # An event may name an identity the user no longer has (deleted, then recreated).
        if record is not None and record.communication_user_id == target.communication_user_id:
            return [record]
    return []


async def _act(clients: Services, action: Action, budget: _Budget) -> list[str]:
    """What became of each identity the event names. A Graph event names an Entra user, who may be
    known under several app keys: each identity done is marked (event, key) after it is acted on,
    so a redelivery after a failure acts only on those not done, even if the user's identities
    changed in between, and one that keeps failing does not stop the others. Marking after acting
    means a mark that fails to land repeats that identity's action, never skips it. An identity
    the delivery's budget has no ACS call left for stays unmarked, for the retry (`_Deferred`)."""
    # Ended before looking: a first issue of this user still creating its identity either sees
    # this when it looks again after its mapping insert (shared/tokens.py), or is seen here.
    await _end_sessions(clients, action, [])
    records = await _records_for(clients, action)
    if records:  # by their app keys too, and on each mapping a revoke keeps
        await _end_sessions(clients, action, records)
    if not records:
        return ["unknown_user"]  # no identity to act on; the sessions are ended all the same
    graph = bool(action.target.tenant_id and action.target.object_id)
    store = clients.store
    outcomes: list[str] = []
    failures: list[Exception] = []
    deferred = False
    for record in records:
        done = (
            keys.identity_mark(action.schema, action.source, action.event_id, record.user_key)
            if graph
            else None
        )
        try:
            if done and await store.marks.seen(done):
                outcomes.append("duplicate")
                continue
            if not budget.take_acs_call():
                deferred = True
                continue
            outcomes.append(await _apply(clients, action, record))
            if done:
                await store.marks.mark_done(done, dt.datetime.now(dt.UTC))
        except Exception as err:  # noqa: BLE001 - raised once the others have had their turn
            failures.append(err)
    if failures:
        raise failures[0]
    if deferred:
        raise _Deferred(outcomes)
    return outcomes


async def _event(clients: Services, action: Action, budget: _Budget, gate: asyncio.Semaphore) -> list[str]:
    """One event, once: skipped if marked, marked once every identity it names is done."""
    return await _once(
        clients,
        action.schema,
        action.source,
        action.event_id,
        budget,
        gate,
        lambda: _act(clients, action, budget),
    )


async def _notice(
    clients: Services, notice: Lifecycle, budget: _Budget, gate: asyncio.Semaphore
) -> list[str]:
    """One Graph lifecycle notification, once, like any event."""

    async def renew() -> list[str]:
        return [await clients.graph.on_lifecycle(notice)]

    return await _once(clients, notice.schema, notice.source, notice.event_id, budget, gate, renew)


async def _once(
    clients: Services,
    schema: str,
    source: str,
    event_id: str,
    budget: _Budget,
    gate: asyncio.Semaphore,
    work: Callable[[], Awaitable[list[str]]],
) -> list[str]:
    """Do an event's work unless it was done (its mark), then mark it: a redelivery skips it."""
    async with gate:
        if not budget.open():
            raise _Deferred
        mark = keys.event_mark(schema, source, event_id)
        if await clients.store.marks.seen(mark):
            return ["duplicate"]
        outcomes = await work()
        await clients.store.marks.mark_done(mark, dt.datetime.now(dt.UTC))
        return outcomes


async def _work_through(
    clients: Services, delivery: Delivery, budget: _Budget
) -> tuple[Counter[str], list[Exception]]:
    """Every event of the delivery, side by side within the budget: the outcomes, "deferred" for
    each event left for Event Grid's retry, and the failures.

    Events about one target run one after another in delivery order (a revoke, then a delete, of
    the same user stays in that order, and a user's repeated events do not race each other);
    different targets run concurrently, CONCURRENCY at a time. An event cut off at CUTOFF_SECONDS
    is cancelled where it stands: unmarked, like a crash, so the retry does it again.
    """
    gate = asyncio.Semaphore(CONCURRENCY)
    results: Counter[str] = Counter()
    failures: list[Exception] = []
    settled = 0

    async def settle(work: Awaitable[list[str]]) -> None:
        nonlocal settled
        try:
            results.update(await work)
        except _Deferred as left:
            results.update(left.outcomes)
            results["deferred"] += 1
        except Exception as err:  # noqa: BLE001 - raised by the caller: Event Grid retries the batch
            failures.append(err)
        settled += 1

    async def in_order(actions: list[Action]) -> None:
        for action in actions:
            await settle(_event(clients, action, budget, gate))

    by_target: dict[EventTarget, list[Action]] = {}
    for action in delivery.actions:
        by_target.setdefault(action.target, []).append(action)
    tasks = [asyncio.create_task(in_order(actions)) for actions in by_target.values()]
    tasks += [asyncio.create_task(settle(_notice(clients, n, budget, gate))) for n in delivery.lifecycle]
    if tasks:
        _, running = await asyncio.wait(tasks, timeout=max(0.0, budget.cut_at - time.monotonic()))
        for task in running:
            task.cancel()
        if running:  # cancelled tasks end at their next await; this only lets them unwind
            await asyncio.wait(running, timeout=1)
    if cut_off := len(delivery.actions) + len(delivery.lifecycle) - settled:
        results["deferred"] += cut_off
    return results, failures


async def _end_sessions(clients: Services, action: Action, records: list[IdentityRecord]) -> None:
    """Bearers issued before the event no longer get anything (shared/sessions.py `Sessions.check`):
    by every app key it reaches, and by (tenant, object id) for an Entra user, which also covers
    keys that have no identity yet. Written first, so a failure later leaves it in place, and
    at the event's own time, so a redelivery writes the same moment."""
    now = dt.datetime.now(dt.UTC)
    when = min(action.occurred_at, now) if action.occurred_at else now
    target = action.target
    user_keys = [record.user_key for record in records]
    if target.issuer and target.subject:
        user_keys.append(keys.user_key(target.issuer, target.subject))
    entra = (target.tenant_id, target.object_id) if target.tenant_id and target.object_id else None
    if not user_keys and entra is None:
        return  # an identity nobody maps to: no user to end
    # A revoke keeps the mapping: the moment goes on it too, so that refreshes need no extra read.
    mapped = records if action.kind == "revoke" else []
    await clients.store.lookups.end_sessions(
        when, action.event_type, user_keys=user_keys, entra=entra, mapped=mapped
    )


async def _apply(clients: Services, action: Action, record: IdentityRecord) -> str:
    source = f"event:{action.event_type}"
    if action.kind == "delete":
        return (await clients.revocation.delete(record, source=source)).status
    return (await clients.revocation.revoke(record, source=source)).status


async def _observe(clients: Services, delivery: Delivery, budget: _Budget) -> None:
    """Note the Graph subscription the user events came through (bookkeeping: never fails them,
    nor delays the answer past the delivery's cut-off)."""
    if not delivery.subscriptions:
        return
    try:
        async with asyncio.timeout(max(0.0, budget.cut_at - time.monotonic())):
            await clients.graph.observe(delivery.subscriptions)
    except Exception as err:  # noqa: BLE001 - the events were handled; the next ones note it again
        log.warning("graph subscription not noted: %s", type(err).__name__)


async def act_on(clients: Services, delivery: Delivery, started: float) -> Counter[str]:
    """What each event of a parsed delivery came to, worked through within the budget counted from
    `started`. Each event gets its turn; then a failure answers for the batch (raised), and so does
    work left for Event Grid's retry (`events_deferred`)."""
    budget = _Budget(started)
    results, failures = await _work_through(clients, delivery, budget)
    await _observe(clients, delivery, budget)
    results["ignored"] = delivery.ignored
    log.info("events handled: %s", " ".join(f"{k}={v}" for k, v in sorted(results.items())))
    if failures:
        raise failures[0]
    if deferred := results["deferred"]:
        raise Unavailable(
            f"{deferred} of {len(delivery.actions) + len(delivery.lifecycle)} events were left for "
            "Event Grid's retry: this delivery's time or ACS budget ran out.",
            code=Code.EVENTS_DEFERRED,
            retry_after=RETRY_AFTER_SECONDS,
        )
    return results
