"""All the stores over one table, built together: what `shared.compose` hands the services."""

from __future__ import annotations

from collections.abc import Callable

from azure.data.tables.aio import TableClient

from .identities import Identities
from .lookups import Lookups
from .marks import EventMarks
from .pending import Pending
from .retention import Retention
from .subscription import SubscriptionStore
from .table import Table


class Stores:
    """One `Table` over the client, and each concept's store on it."""

    def __init__(
        self,
        client: TableClient,
        *,
        object_id_issuer: str | None = None,
        object_id_issuers: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.table = Table(client)
        self.lookups = Lookups(
            self.table, object_id_issuer=object_id_issuer, object_id_issuers=object_id_issuers
        )
        self.pending = Pending(self.table)
        self.retention = Retention(self.table, self.lookups, self.pending)
        self.identities = Identities(self.table, self.lookups, self.retention, self.pending)
        self.marks = EventMarks(self.table)
        self.subscription = SubscriptionStore(self.table)
