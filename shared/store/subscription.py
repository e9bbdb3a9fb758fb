"""The Microsoft Graph subscription's state, `PK="graph-subscription", RK="current"`: one row,
read by /api/health and the cleanup timer, written by the webhook (lifecycle events) and the timer
(shared/graph/)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .. import telemetry
from . import keys
from .table import Table


@dataclass(frozen=True)
class GraphSubscriptionState:
    """What the service knows of its Microsoft Graph subscription on users (`shared.graph`).

    `outcome` is "ok" after a renewal or creation succeeded, "observed" when the subscription is only
    known from the events it delivered, else the last failure's code. No secret: Graph ids and times.
    """

    subscription_id: str  # "" while none exists (creation failed)
    expires_at: dt.datetime | None
    outcome: str
    attempted_at: dt.datetime | None = None  # last renewal or creation attempt
    renewed_at: dt.datetime | None = None  # last success
    missed_at: dt.datetime | None = None  # last "missed" lifecycle notification

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": keys.GRAPH_SUBSCRIPTION_PARTITION,
            "RowKey": keys.GRAPH_SUBSCRIPTION_ROW,
            "subscriptionId": self.subscription_id,
            "outcome": self.outcome,
        }
        for name, value in (
            ("expiresAt", self.expires_at),
            ("attemptedAt", self.attempted_at),
            ("renewedAt", self.renewed_at),
            ("missedAt", self.missed_at),
        ):
            if value is not None:  # Table Storage keeps no nulls: an absent property reads as None
                entity[name] = value
        return entity

    @classmethod
    def from_entity(cls, entity: dict[str, Any]) -> GraphSubscriptionState:
        return cls(
            subscription_id=entity.get("subscriptionId", ""),
            expires_at=entity.get("expiresAt"),
            outcome=entity.get("outcome", ""),
            attempted_at=entity.get("attemptedAt"),
            renewed_at=entity.get("renewedAt"),
            missed_at=entity.get("missedAt"),
        )


class SubscriptionStore:
    def __init__(self, table: Table) -> None:
        self.table = table

    @telemetry.table_operation("graph_subscription")
    async def get(self) -> GraphSubscriptionState | None:
        entity = await self.table.get(keys.GRAPH_SUBSCRIPTION_PARTITION, keys.GRAPH_SUBSCRIPTION_ROW)
        return GraphSubscriptionState.from_entity(entity) if entity is not None else None

    @telemetry.table_operation("save_graph_subscription")
    async def save(self, state: GraphSubscriptionState) -> None:
        """Replace the row whole: each write states the latest attempt, so the last one wins."""
        await self.table.upsert(state.to_entity())
