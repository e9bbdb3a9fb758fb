"""Keeping the Microsoft Graph change-notification subscription on users alive.

Why this exists: Graph subscriptions expire (users: at most 41,760 minutes, under 29 days; Graph's
"subscription resource type"), and once one has, deleted and disabled users stop reaching the
webhook with no error anywhere. Graph warns with lifecycle notifications, delivered like the user
events through the partner topic the subscription's lifecycleNotificationUrl names; the answer is
`PATCH /v1.0/subscriptions/{id}` with a new expirationDateTime, which renews and reauthorizes at
once ("Reduce missing subscriptions and change notifications", Microsoft Learn). A warning can be
lost (an event subscription that filters it out, a delivery dropped), so the cleanup timer renews a
subscription that is due as well, and, with GRAPH_NOTIFICATION_URL set, creates one when there is
none. It is the service that creates it because a subscription belongs to the app that made it:
with application permissions Graph shows an app only the "subscriptions created by this app"
(Graph, "List subscriptions"), so the managed identity that renews should be the one that created.
Creation happens only on the timer, which the Functions host runs on one instance at a time (its
storage lock), so two instances never create two subscriptions.

What happened is recorded in Table Storage (`shared.store.subscription`), which /api/health
reads: a failed renewal, or an expiry under 3 days, is "degraded". A failure that a retry may fix
raises Unavailable, so the webhook answers 503 and Event Grid redelivers; one that needs the
operator (no permission, a subscription Graph does not know) is recorded, answered 200, and tried
again by the timer.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..clock import Clock, iso, utcnow
from ..errors import Unavailable
from ..events import MISSED, Lifecycle, SubscriptionSeen
from ..store.stores import Stores
from ..store.subscription import GraphSubscriptionState
from .client import GraphClient, Retryable, expiry, refusal

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("acs_token_service.graph")

MAX_LIFETIME = dt.timedelta(minutes=41760)  # users, groups and other directory resources
RENEW_FOR = MAX_LIFETIME - dt.timedelta(hours=1)  # under the maximum, whatever the clocks' skew
RENEW_WITHIN = dt.timedelta(days=7)  # the timer renews a subscription with less time left
DEGRADED_WITHIN = dt.timedelta(days=3)  # health: the timer has been failing for 4 days by then
RETRY_AFTER_FAILURE = dt.timedelta(minutes=15)  # the timer's pace for renewals that keep failing
MISSED_SHOWN_FOR = dt.timedelta(days=1)  # health reports a "missed" notification this long
OK_OUTCOMES = ("ok", "observed")


class GraphSubscriptions:
    """Renews (and, when configured, creates) the service's Graph subscription; reports on it."""

    def __init__(
        self,
        store: Stores,
        settings: Settings,
        *,
        credential: Any | None,
        make_credential: Callable[[], Any],
        transport_options: dict | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.notification_url = settings.graph_notification_url
        self.clock = clock
        self.client = GraphClient(
            settings.graph_endpoint,
            credential=credential,
            make_credential=make_credential,
            transport_options=transport_options,
        )

    async def close(self) -> None:
        await self.client.close()

    # ---- renew and create --------------------------------------------------------------------------

    async def renew(self, subscription_id: str, *, reason: str) -> str:
        """PATCH a new expirationDateTime: "graph_renewed" or "graph_renewal_failed" (recorded).

        Raises Unavailable, after recording it, when Graph is throttled, down or unreachable, or the
        identity gets no token: worth a redelivery. A failure for a subscription that is not the one
        on record, while that one is fine, is logged only (a stale notification must not make
        health degraded).
        """
        outcome = await self._renew(subscription_id, await self.store.subscription.get(), reason)
        return "graph_renewed" if outcome == "ok" else "graph_renewal_failed"

    async def _renew(self, subscription_id: str, current: GraphSubscriptionState | None, reason: str) -> str:
        """`renew` given the record as read: the outcome recorded ("ok" or a failure code)."""
        now = self.clock()
        previous = current if current is not None and current.subscription_id == subscription_id else None
        base = previous or GraphSubscriptionState(subscription_id, None, "observed")
        try:
            status, body = await self.client.call(
                "PATCH",
                f"subscriptions/{quote(subscription_id, safe='')}",
                {"expirationDateTime": iso(now + RENEW_FOR)},
            )
        except Retryable as err:
            log.warning("Graph subscription %s not renewed (%s): %s", subscription_id, reason, err.code)
            if previous is not None or current is None or current.outcome not in OK_OUTCOMES:
                await self.store.subscription.save(replace(base, outcome=err.code, attempted_at=now))
            raise Unavailable(
                "Microsoft Graph could not be reached to renew the subscription.",
                code=err.code,
                retry_after=err.retry_after,
            ) from None
        if status == 200:
            expires = expiry(body, now + RENEW_FOR)
            await self.store.subscription.save(
                replace(base, expires_at=expires, outcome="ok", attempted_at=now, renewed_at=now)
            )
            log.info("Graph subscription %s renewed (%s) until %s", subscription_id, reason, iso(expires))
            return "ok"
        outcome = refusal(status, body)
        if previous is not None or current is None or current.outcome not in OK_OUTCOMES:
            await self.store.subscription.save(replace(base, outcome=outcome, attempted_at=now))
        return outcome

    async def create(self, current: GraphSubscriptionState | None) -> str:
        """POST a subscription on users that delivers to the partner topic GRAPH_NOTIFICATION_URL
        names, lifecycle notifications included ("Receive Microsoft Graph API change events
        through Azure Event Grid": the same partner topic for both). `current`: the record."""
        now = self.clock()
        body = {
            "changeType": "updated,deleted",
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.notification_url,
            "resource": "users",
            "expirationDateTime": iso(now + RENEW_FOR),
        }
        try:
            status, answer = await self.client.call("POST", "subscriptions", body)
        except Retryable as err:
            log.warning("Graph subscription not created: %s", err.code)
            await self._save_failure(current, err.code, now)
            return "graph_create_failed"
        subscription_id = answer.get("id")
        if status == 201 and isinstance(subscription_id, str) and subscription_id:
            expires = expiry(answer, now + RENEW_FOR)
            missed = current.missed_at if current is not None else None
            await self.store.subscription.save(
                GraphSubscriptionState(subscription_id, expires, "ok", now, now, missed)
            )
            log.info("Graph subscription %s created until %s", subscription_id, iso(expires))
            return "graph_created"
        await self._save_failure(current, refusal(status, answer), now)
        return "graph_create_failed"

    async def _save_failure(
        self, current: GraphSubscriptionState | None, outcome: str, now: dt.datetime
    ) -> None:
        """A creation that failed leaves no subscription: the record says so, and why."""
        missed = current.missed_at if current is not None else None
        await self.store.subscription.save(GraphSubscriptionState("", None, outcome, now, None, missed))

    # ---- what the webhook and the timer call -------------------------------------------------------

    async def on_lifecycle(self, notice: Lifecycle) -> str:
        """A lifecycle notification: renew (reauthorizationRequired; subscriptionRemoved too, whose
        404 tells the timer to create a new one), or record a "missed" one for health."""
        if notice.lifecycle_event == MISSED:
            now = self.clock()
            state = await self.store.subscription.get()
            base = state or GraphSubscriptionState(notice.subscription_id, notice.expires_at, "observed")
            await self.store.subscription.save(replace(base, missed_at=now))
            log.warning(
                "Microsoft Graph missed change notifications for subscription %s: users deleted or "
                "disabled meanwhile may keep ACS access; revoke them with /api/manage",
                notice.subscription_id,
            )
            return "graph_missed_recorded"
        return await self.renew(notice.subscription_id, reason=notice.lifecycle_event)

    async def observe(self, seen: Iterable[SubscriptionSeen]) -> None:
        """Learn a subscription from the user events it delivers: the first one when none is on
        record (so health shows its expiry, and the timer renews it in time), and the expiry of the
        one on record when Graph reports it later than we knew."""
        for sighting in seen:
            state = await self.store.subscription.get()
            if state is None:
                await self.store.subscription.save(
                    GraphSubscriptionState(sighting.subscription_id, sighting.expires_at, "observed")
                )
            elif state.subscription_id == sighting.subscription_id and (
                state.expires_at is None or sighting.expires_at > state.expires_at
            ):
                await self.store.subscription.save(replace(state, expires_at=sighting.expires_at))

    async def maintain(self) -> dict[str, int]:
        """The timer's turn: create the subscription if there is none (and GRAPH_NOTIFICATION_URL
        says where), renew it when under RENEW_WITHIN of its expiry or after a failure (at most
        every RETRY_AFTER_FAILURE). Raises Unavailable like `renew`."""
        now = self.clock()
        state = await self.store.subscription.get()
        failed = state is not None and state.outcome not in OK_OUTCOMES
        waiting = failed and state.attempted_at is not None and now - state.attempted_at < RETRY_AFTER_FAILURE
        if state is None or not state.subscription_id:
            if self.notification_url is None or waiting:
                return {}
            return {await self.create(state): 1}
        if state.outcome == "subscription_not_found" and self.notification_url is not None:
            return {await self.create(state): 1}  # Graph has removed it (expired, or taken away)
        due = failed or state.expires_at is None or state.expires_at - now < RENEW_WITHIN
        if not due or waiting:
            return {}
        outcome = await self._renew(state.subscription_id, state, "timer")
        if outcome == "ok":
            return {"graph_renewed": 1}
        if outcome == "subscription_not_found" and self.notification_url is not None:
            return {"graph_renewal_failed": 1, await self.create(state): 1}
        return {"graph_renewal_failed": 1}

    async def health(self) -> tuple[str, bool] | None:
        """The `graphSubscription` health check: (text, healthy), or None when Graph is not in use
        (no subscription on record and none to create). Times and codes only, no secret."""
        state = await self.store.subscription.get()
        if state is None:
            if self.notification_url is None:
                return None
            return "degraded: no subscription yet (the cleanup timer creates it)", False
        now = self.clock()
        attempted = iso(state.attempted_at) if state.attempted_at else "unknown time"
        if not state.subscription_id:
            return f"degraded: creation failed ({state.outcome}) at {attempted}", False
        if state.outcome not in OK_OUTCOMES:
            return f"degraded: renewal failed ({state.outcome}) at {attempted}", False
        if state.expires_at is None:
            return "ok (expiry not known yet)", True
        if state.expires_at - now < DEGRADED_WITHIN:
            return f"degraded: expires {iso(state.expires_at)}", False
        if state.missed_at is not None and now - state.missed_at < MISSED_SHOWN_FOR:
            return f"degraded: Graph missed change notifications at {iso(state.missed_at)}", False
        return f"ok (expires {iso(state.expires_at)})", True
