"""The worker's object graph, composed once from its settings: one set of aio SDK clients and the
services built on them, reused by every request.

A client per request would pay a TLS handshake and a credential token fetch every time; these
objects are safe to share across concurrent requests on the worker's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .clock import Clock, utcnow
from .settings import Settings, get_settings

if TYPE_CHECKING:  # the SDKs load on first use (`compose`), not when function_app is indexed
    from azure.communication.identity.aio import CommunicationIdentityClient as AsyncIdentityClient
    from azure.data.tables.aio import TableClient as AsyncTableClient

    from .auth import EasyAuthAuthenticator, JwksCache, JwtAuthenticator
    from .cleanup import Cleanup
    from .graph import GraphSubscriptions
    from .ratelimit import RateLimiter
    from .revocation import RevocationService
    from .store.stores import Stores
    from .teams import TeamsExchange
    from .tokens import TokenService

# azure-core retries connection failures only: ACS's answers (429, 5xx) are the gateway's to retry,
# through the worker's throttle and retry budget (shared/acs.py, shared/throttle.py).
ACS_CLIENT_OPTIONS = {
    "retry_total": 3,
    "retry_status": 0,
    "retry_connect": 3,
    "retry_backoff_factor": 0.25,
    "retry_backoff_max": 2,
    "connection_timeout": 5,
    "read_timeout": 15,
}
TABLE_CLIENT_OPTIONS = {
    "retry_total": 3,
    "retry_backoff_factor": 0.3,
    "connection_timeout": 5,
    "read_timeout": 10,
}

# The Azure SDK libraries the service uses. Not the whole `azure` logger: `azure.functions` is the
# Functions worker's own (its system logs, which stay as the worker sets them).
SDK_LOGGERS = ("azure.core", "azure.identity", "azure.communication", "azure.data", "azure.monitor")


@dataclass
class Services:
    """What a worker serves every request with: built once (`compose`), shared by all."""

    settings: Settings
    authenticator: JwtAuthenticator | EasyAuthAuthenticator
    issuer_keys: dict[str, JwksCache]  # each trusted issuer's key cache (jwt), by issuer
    tokens: TokenService
    revocation: RevocationService
    cleanup: Cleanup
    store: Stores
    teams: TeamsExchange
    graph: GraphSubscriptions  # the Microsoft Graph subscription (shared/graph/)
    limiter: RateLimiter | None  # token routes: RATE_LIMIT_PER_MINUTE, off unless set
    # On in every deployment: revocations and deletions, per user and per admin (ratelimit.py: why).
    revocation_limiter: RateLimiter
    manage_limiter: RateLimiter
    closers: tuple[Callable[[], Awaitable[None]], ...]

    @property
    def jwks(self) -> JwksCache | None:
        """The first trusted issuer's keys (for one issuer, its only ones); None with Easy Auth."""
        return next(iter(self.issuer_keys.values()), None)

    async def close(self) -> None:
        for close in self.closers:
            await close()


def transport_options() -> dict:
    """aiohttp's per-request environment lookups off, unless the environment names a proxy.

    With `use_env_settings` on (azure-core's default) every SDK request first looks for a .netrc
    entry and for proxy variables on worker threads: two thread hand-offs per call, which cost a
    Table read or an ACS call almost as much CPU as the rest of it. Without proxy variables
    (HTTP_PROXY, HTTPS_PROXY, ...) those lookups find nothing, so turning them off changes no
    behaviour (a .netrc entry would only clash with the SDK's own Authorization header).
    """
    import urllib.request

    return {} if urllib.request.getproxies() else {"use_env_settings": False}


def quiet_sdk_loggers() -> None:
    """Set the Azure SDK loggers to WARNING, whatever the root logger's level.

    In Azure the worker sets the root logger to INFO and sends every record to Application
    Insights, and azure-core's HTTP logging policy logs each request's URL at INFO: ACS URLs name
    the identity (`8:acs:...`). Only the SDK's warnings and errors are worth keeping.
    """
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _credential(settings: Settings):
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential(
        managed_identity_client_id=settings.managed_identity_client_id,
        exclude_interactive_browser_credential=True,
    )


def table_client(settings: Settings, credential: Any | None = None) -> AsyncTableClient:
    """The Table Storage client the settings ask for (`compose`'s, unless a test injects its own):
    by connection string, or by endpoint with the credential."""
    from azure.data.tables.aio import TableClient

    options = {**TABLE_CLIENT_OPTIONS, **transport_options()}
    if settings.tables_connection_string:
        return TableClient.from_connection_string(
            settings.tables_connection_string, settings.table_name, **options
        )
    assert settings.tables_endpoint and credential  # settings.load asks for one or the other
    return TableClient(settings.tables_endpoint, settings.table_name, credential=credential, **options)


def acs_client(settings: Settings, credential: Any | None = None) -> AsyncIdentityClient:
    """The ACS Identity client the settings ask for (`compose`'s, unless a test injects its own):
    by connection string, or by endpoint with the credential."""
    from azure.communication.identity.aio import CommunicationIdentityClient

    options = {**ACS_CLIENT_OPTIONS, **transport_options()}
    if settings.acs_connection_string:
        return CommunicationIdentityClient.from_connection_string(settings.acs_connection_string, **options)
    assert settings.acs_endpoint and credential  # settings.load asks for one or the other
    return CommunicationIdentityClient(settings.acs_endpoint, credential, **options)


def compose(
    settings: Settings,
    *,
    table: AsyncTableClient | None = None,
    acs: AsyncIdentityClient | None = None,
    clock: Clock = utcnow,
) -> Services:
    """A worker's services, built from its settings. The seams tests inject through: the Table
    Storage and ACS clients (a wrapped or a differently configured one; the services close them),
    and the clock every service reads."""
    # Imported here, on the first request, not when the host indexes function_app: the SDKs and
    # the modules built on them are most of the import time, and some functions never need them.
    from . import telemetry
    from .acs import AcsGateway
    from .auth import EasyAuthAuthenticator, JwksCache, JwtAuthenticator
    from .cleanup import Cleanup
    from .graph import GraphSubscriptions
    from .issuers import TrustedIssuers
    from .ratelimit import MANAGE_PER_MINUTE, REVOCATIONS_PER_MINUTE, RateLimiter
    from .revocation import RevocationService
    from .store.stores import Stores
    from .teams import TeamsExchange
    from .throttle import Throttle
    from .tokens import TokenService

    quiet_sdk_loggers()  # before any SDK call: its INFO records would reach Application Insights
    telemetry.configure_in_background()  # Azure Monitor export, if asked for; never on this event loop
    credential = None
    if (acs is None and not settings.acs_connection_string) or (
        table is None and not settings.tables_connection_string
    ):
        credential = _credential(settings)

    if acs is None:
        acs = acs_client(settings, credential)
    if table is None:
        table = table_client(settings, credential)

    trusted = TrustedIssuers(settings.trusted_issuers)
    caches: dict[str, JwksCache] = {}
    authenticator: JwtAuthenticator | EasyAuthAuthenticator
    if settings.auth_mode == "easyauth":
        authenticator = EasyAuthAuthenticator(settings)
    else:
        # One key cache per trusted issuer: one issuer's keys never check another's tokens.
        caches = {t.issuer: JwksCache(t.issuer, metadata_url=t.metadata_url) for t in trusted.entries}
        authenticator = JwtAuthenticator(trusted, caches)
    store = Stores(
        table,
        object_id_issuer=settings.object_id_issuer,
        object_id_issuers=trusted.object_id_issuers if settings.issuer_list else None,
    )
    # Past ACS's limits (shared/throttle.py); off, every call goes to ACS (the storm bench's baseline).
    gateway = AcsGateway(acs, Throttle(enabled=settings.storm_protection))
    revocation = RevocationService(store, gateway, clock)
    # Graph takes no key: with connection strings for ACS and Storage it makes the credential
    # itself, on its first call; otherwise it shares the worker's. Its pipeline is made then too.
    graph = GraphSubscriptions(
        store,
        settings,
        credential=credential,
        make_credential=lambda: _credential(settings),
        transport_options=transport_options(),
        clock=clock,
    )
    closers = (
        [acs.close, table.close, graph.close]
        + [keys.close for keys in caches.values()]
        + ([credential.close] if credential else [])
    )
    return Services(
        settings=settings,
        authenticator=authenticator,
        issuer_keys=caches,
        tokens=TokenService(
            store,
            gateway,
            clock,
            revocation=revocation,
            retention_days=settings.retention_days,
            storm_protection=settings.storm_protection,
        ),
        revocation=revocation,
        cleanup=Cleanup(store, gateway, retention_days=settings.retention_days, clock=clock, graph=graph),
        store=store,
        teams=TeamsExchange(gateway, settings),
        graph=graph,
        limiter=RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None,
        revocation_limiter=RateLimiter(REVOCATIONS_PER_MINUTE, what="revocations and deletions"),
        manage_limiter=RateLimiter(MANAGE_PER_MINUTE, what="revocations and deletions"),
        closers=tuple(closers),
    )


_services: Services | None = None


def services() -> Services:
    """The worker's services, composed on first use from its settings."""
    global _services
    if _services is None:
        _services = compose(get_settings())
    return _services


def install(replacement: Services) -> None:
    """Serve with these services from now on (tests: ones composed with a seam)."""
    global _services
    _services = replacement


async def reset_services() -> None:
    """Close and forget the worker's services (tests, and settings changes)."""
    global _services
    current, _services = _services, None
    if current is not None:
        await current.close()
