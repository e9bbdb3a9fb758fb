"""The identity map in Azure Table Storage: app user <-> ACS identity, and the work around it.

Rows (one table, every lookup a point read or a key-range scan; keys.py names them):
- mapping `PK=user_key(issuer, sub), RK="identity"` (identities.py): the ACS id, who
  it belongs to, oid/tid, when it was created and last used, and any pending revoke/delete. One
  point read answers every token request, including "is this user blocked by a pending
  revocation?". A partition per user: the hot path spreads over the whole table.
- the index, `PK="index"`: every lookup by something other than the user, in one partition so that
  a first issue files them all in one entity-group transaction (one request, all or nothing):
  owner and Graph rows (lookups.py), the user's retention entry (retention.py), and the rows of
  sessions an event ended (lookups.py). It takes first issues and the timer's moves, not the
  per-request traffic: one partition serves about 2,000 entities a second, several hundred first
  issues a second.
- pending `PK="pending"` (pending.py): revocations and deletions that could not reach ACS yet,
  with attempts, next attempt and a lease; the timer completes them.
- events `PK="events"` (marks.py): events (and a Graph event's identities) already acted on.
- Graph subscription `PK="graph-subscription", RK="current"` (subscription.py): the Microsoft
  Graph change-notification subscription the service keeps alive, for the timer and health.

Every store works through one `table.Table`, the only code that sees azure-core; `stores.Stores`
builds them all. This package's own import loads no SDK: `keys` and `errors` are imported when
function_app is.
"""
