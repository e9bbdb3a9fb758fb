"""The settings table: every app setting once (name, type, default, rule, purpose), read once.

Tests, the local stack and the infra checks take setting names from `TABLE`, never a list of
their own. Importing function_app must do no I/O and need no setting (the Functions host indexes
it first), so nothing here runs at import. A bad or missing setting raises SettingError naming it;
every route but health then answers 503 with that name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import issuers
from .config import Setting, choice, flag, https_url, integer, lowered, names, text, within

SCOPES = ("chat", "voip", "chat.join", "chat.join.limited", "voip.join")
ACS_MIN_MINUTES, ACS_MAX_MINUTES = 60, 1440
# Asymmetric algorithms only: HS* with a public key as secret, and "none", are classic JWT attacks.
SAFE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
# The partner-topic address Graph delivers to ("Receive Microsoft Graph API change events through
# Azure Event Grid", Microsoft Learn): these four query parameters, all required.
GRAPH_EVENT_GRID_PARAMETERS = ("azuresubscriptionid", "resourcegroup", "partnertopic", "location")
# Set by App Service, never by the operator (so not in TABLE): "True" while Authentication is on.
PLATFORM_AUTH_SETTING = "WEBSITE_AUTH_ENABLED"


def _safe_algorithms(values: tuple[str, ...]) -> str | None:
    unsafe = [a for a in values if a not in SAFE_ALGORITHMS]
    return f"{', '.join(unsafe)} not allowed; use {', '.join(SAFE_ALGORITHMS)}" if unsafe else None


def _known_scopes(values: tuple[str, ...]) -> str | None:
    unknown = [s for s in values if s not in SCOPES]
    return f"unknown scopes {', '.join(unknown)}; known: {', '.join(SCOPES)}" if unknown else None


def _issuer_list(value: str) -> tuple[issuers.TrustedIssuer, ...]:
    return issuers.parse(value, safe_algorithms=SAFE_ALGORITHMS, scopes=SCOPES)


def _acs_connection_string(value: str) -> str | None:
    if "endpoint=" in value.lower() and "accesskey=" in value.lower():
        return None
    return "must look like endpoint=https://...;accesskey=..."


def _table_name(value: str) -> str | None:
    if 3 <= len(value) <= 63 and value.isalnum() and value[0].isalpha():
        return None
    return "must be 3-63 letters and digits, starting with a letter"


def _guid(value: str) -> str | None:
    try:
        uuid.UUID(value)
    except ValueError:
        pass
    else:
        if len(value) == 36:
            return None
    return "must be the Entra application (client) id, a GUID"


def _event_grid_address(value: str) -> str | None:
    scheme, _, query = value.partition(":?")
    given = {k.lower(): v for k, _, v in (p.partition("=") for p in query.split("&")) if v}
    if scheme.lower() == "eventgrid" and all(name in given for name in GRAPH_EVENT_GRID_PARAMETERS):
        return None
    return "must be EventGrid:?" + "&".join(f"{n}=..." for n in GRAPH_EVENT_GRID_PARAMETERS)


# fmt: off
# name, type, default (None: unset), rule (None: any value of the type), what it is for. Each entry
# also binds its name here, for `load`. Rules across settings (one of two required, min <= max) are
# in `load`.
TABLE: tuple[Setting[Any, Any], ...] = (
    AUTH_MODE := Setting("AUTH_MODE", lowered, "jwt", choice("jwt", "easyauth"),
        "jwt validates bearer tokens; easyauth trusts App Service Authentication (only while it is on)"),
    AUTH_ISSUER := Setting("AUTH_ISSUER", text, None, None,
        "the OpenID Connect issuer, exactly as in `iss` (https; http only on loopback); jwt needs it"),
    AUTH_AUDIENCE := Setting("AUTH_AUDIENCE", names, (), None,
        "accepted `aud` values (client id or App ID URI of your API); jwt needs one"),
    AUTH_USER_CLAIM := Setting("AUTH_USER_CLAIM", text, "sub", None,
        "the claim that names the user (oid: Graph events find Entra users without a lookup row)"),
    AUTH_ALGORITHMS := Setting("AUTH_ALGORITHMS", names, ("RS256",), _safe_algorithms,
        "allowed signing algorithms"),
    AUTH_ISSUERS := Setting("AUTH_ISSUERS", _issuer_list, None, None,
        "several trusted issuers, a JSON array (README: Several identity providers); replaces the 4 above"),
    ACS_ENDPOINT := Setting("ACS_ENDPOINT", text, None, None,
        "ACS, reached with managed identity (https); this or ACS_CONNECTION_STRING"),
    ACS_CONNECTION_STRING := Setting("ACS_CONNECTION_STRING", text, None, _acs_connection_string,
        "ACS with its access key; wins over ACS_ENDPOINT"),
    TABLES_ENDPOINT := Setting("TABLES_ENDPOINT", text, None, None,
        "Table Storage, reached with managed identity (https); this or TABLES_CONNECTION_STRING"),
    TABLES_CONNECTION_STRING := Setting("TABLES_CONNECTION_STRING", text, None, None,
        "Table Storage with its account key; wins over TABLES_ENDPOINT"),
    IDENTITY_TABLE := Setting("IDENTITY_TABLE", text, "acsidentities", _table_name,
        "the table that maps users to ACS identities (created on first use)"),
    AZURE_CLIENT_ID := Setting("AZURE_CLIENT_ID", text, None, None,
        "client id of a user-assigned managed identity; unset: the system-assigned one"),
    TOKEN_ALLOWED_SCOPES := Setting("TOKEN_ALLOWED_SCOPES", names, SCOPES, _known_scopes,
        "scopes callers may ask for"),
    TOKEN_DEFAULT_SCOPES := Setting("TOKEN_DEFAULT_SCOPES", names, ("chat", "voip"), None,
        "scopes when a request names none (unset: those of these allowed, else the first allowed)"),
    TOKEN_DEFAULT_MINUTES := Setting("TOKEN_DEFAULT_MINUTES", integer, ACS_MIN_MINUTES, None,
        "token lifetime when a request names none (unset: this or TOKEN_MIN_MINUTES if more)"),
    TOKEN_MIN_MINUTES := Setting("TOKEN_MIN_MINUTES", integer, ACS_MIN_MINUTES, None,
        "the shortest lifetime a request may ask for"),
    TOKEN_MAX_MINUTES := Setting("TOKEN_MAX_MINUTES", integer, ACS_MAX_MINUTES, None,
        "the longest lifetime a request may ask for"),
    IDENTITY_RETENTION_DAYS := Setting("IDENTITY_RETENTION_DAYS", integer, 90, within(1, 3650),
        "delete identities unused (no issue or refresh) for this long"),
    CLEANUP_SCHEDULE := Setting("CLEANUP_SCHEDULE", text, "0 */5 * * * *", None,
        "the cleanup timer's NCRONTAB schedule; the Functions host reads it (%CLEANUP_SCHEDULE%)"),
    EVENTS_REVOKE_ON_USER_UPDATED := Setting("EVENTS_REVOKE_ON_USER_UPDATED", flag, True, None,
        "revoke a user's tokens on Microsoft.Graph.UserUpdated"),
    EVENTS_USER_DELETED_TYPES := Setting("EVENTS_USER_DELETED_TYPES", names, (), None,
        "your app's event types that delete a user's identity"),
    EVENTS_CREDENTIALS_CHANGED_TYPES := Setting("EVENTS_CREDENTIALS_CHANGED_TYPES", names, (), None,
        "your app's event types that revoke a user's tokens"),
    STORM_PROTECTION := Setting("STORM_PROTECTION", lowered, "on", choice("on", "off"),
        "on: fresh tokens answered again, identical requests share one ACS call; off: one call each"),
    RATE_LIMIT_PER_MINUTE := Setting("RATE_LIMIT_PER_MINUTE", integer, 0, within(0, 100_000, " (off)"),
        "per-user requests a minute on the token routes (then 429 and Retry-After); 0: off"),
    TEAMS_CLIENT_APP_ID := Setting("TEAMS_CLIENT_APP_ID", text, None, _guid,
        "the Entra app (client) id your Teams client uses; POST /api/teams/token needs it"),
    DEMO_PAGE_ENABLED := Setting("DEMO_PAGE_ENABLED", flag, False, None,
        "serve the browser demo page, GET /api/demo"),
    GRAPH_ENDPOINT := Setting("GRAPH_ENDPOINT", text, "https://graph.microsoft.com", https_url,
        "Microsoft Graph, where the subscription on users is created and renewed"),
    GRAPH_NOTIFICATION_URL := Setting("GRAPH_NOTIFICATION_URL", text, None, _event_grid_address,
        "the Graph partner topic's EventGrid:? address; set, the timer creates the subscription"),
    APPLICATIONINSIGHTS_CONNECTION_STRING := Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", text,
        None, None, "export metrics and spans to Application Insights; shared/telemetry reads it"),
)
# fmt: on
SINGLE_ISSUER = (AUTH_ISSUER, AUTH_AUDIENCE, AUTH_USER_CLAIM, AUTH_ALGORITHMS)  # what AUTH_ISSUERS replaces
SETTING_NAMES = tuple(setting.name for setting in TABLE)


@dataclass(frozen=True)
class Settings:
    """What `load` made of the table: the values the services take."""

    auth_mode: str  # "jwt" or "easyauth"
    issuer: str
    audiences: tuple[str, ...]
    user_claim: str
    algorithms: tuple[str, ...]
    acs_connection_string: str | None
    acs_endpoint: str | None
    tables_connection_string: str | None
    tables_endpoint: str | None
    table_name: str
    allowed_scopes: tuple[str, ...]
    default_scopes: tuple[str, ...]
    default_minutes: int
    min_minutes: int
    max_minutes: int
    managed_identity_client_id: str | None
    retention_days: int = IDENTITY_RETENTION_DAYS.default
    rate_limit_per_minute: int | None = None  # None: off (local default); infra turns it on
    storm_protection: bool = True  # shared/storm.py; off: the bench's baseline
    revoke_on_graph_user_updated: bool = EVENTS_REVOKE_ON_USER_UPDATED.default
    user_deleted_event_types: tuple[str, ...] = ()
    credentials_changed_event_types: tuple[str, ...] = ()
    teams_client_app_id: str | None = None  # POST /api/teams/token needs it
    demo_page_enabled: bool = DEMO_PAGE_ENABLED.default
    graph_endpoint: str = GRAPH_ENDPOINT.default  # where the Graph subscription is renewed
    graph_notification_url: str | None = None  # set = create it too (graph.py)
    issuer_list: tuple[issuers.TrustedIssuer, ...] = ()  # AUTH_ISSUERS; () when AUTH_ISSUER is used

    @property
    def trusted_issuers(self) -> tuple[issuers.TrustedIssuer, ...]:
        """AUTH_ISSUERS, or the one issuer AUTH_ISSUER and its settings name."""
        single = issuers.TrustedIssuer(self.issuer, self.audiences, self.algorithms, self.user_claim)
        return self.issuer_list or (single,)

    @property
    def object_id_issuer(self) -> str | None:
        """The issuer whose users are keyed by Entra object id (JWT, AUTH_USER_CLAIM=oid): a Graph
        event, which names users so, finds their mapping without a lookup row. Easy Auth can't tell."""
        return self.issuer if self.auth_mode == "jwt" and self.user_claim == "oid" else None


def _platform_authentication_on(env: Mapping[str, str]) -> bool:
    """Whether App Service Authentication is on, which alone makes X-MS-CLIENT-PRINCIPAL trustworthy.

    The platform strips client-sent X-MS-CLIENT-* headers only when the feature is on, and then
    injects WEBSITE_AUTH_ENABLED=True (Microsoft Learn: "Work with user identities in Azure App
    Service authentication"; "Environment variables and app settings in Azure App Service").
    """
    return env.get(PLATFORM_AUTH_SETTING, "").strip().lower() == "true"


def _require_url(setting: Setting[Any, Any], value: str, *, http_on_loopback: bool = False) -> None:
    problem = https_url(value, http_on_loopback=http_on_loopback)
    if problem is not None:
        raise setting.error(problem)


def load(env: Mapping[str, str]) -> Settings:
    """Every setting read once, in this order, then the rules that span settings."""
    auth_mode = AUTH_MODE.read(env)
    if auth_mode == "easyauth" and not _platform_authentication_on(env):
        raise AUTH_MODE.error(
            "easyauth needs App Service Authentication on (the platform then sets "
            f"{PLATFORM_AUTH_SETTING}=True); without it any caller can forge X-MS-CLIENT-PRINCIPAL",
        )
    issuer = AUTH_ISSUER.read(env)
    audiences = AUTH_AUDIENCE.read(env)
    issuer_list = AUTH_ISSUERS.read(env) or ()
    if issuer_list and (auth_mode != "jwt" or any(env.get(s.name) for s in SINGLE_ISSUER)):
        raise AUTH_ISSUERS.error("needs AUTH_MODE=jwt, and replaces AUTH_ISSUER and its 3 settings: set one")
    if auth_mode == "jwt" and not issuer_list:
        if issuer is None or "{" in issuer:
            raise AUTH_ISSUER.error("is required: one issuer (a multi-tenant one goes in AUTH_ISSUERS)")
        _require_url(AUTH_ISSUER, issuer, http_on_loopback=True)
        if not audiences:
            raise AUTH_AUDIENCE.error("is required: the audience (client id or App ID URI) of your API")
    algorithms = AUTH_ALGORITHMS.read(env)

    acs_cs, acs_endpoint = ACS_CONNECTION_STRING.read(env), ACS_ENDPOINT.read(env)
    if acs_cs is None and acs_endpoint is None:
        raise ACS_ENDPOINT.error("is required (or ACS_CONNECTION_STRING, which holds a key)")
    if acs_cs is None and acs_endpoint is not None:
        _require_url(ACS_ENDPOINT, acs_endpoint)
    tables_cs, tables_endpoint = TABLES_CONNECTION_STRING.read(env), TABLES_ENDPOINT.read(env)
    if tables_cs is None and tables_endpoint is None:
        raise TABLES_ENDPOINT.error("is required (or TABLES_CONNECTION_STRING, which holds a key)")
    if tables_cs is None and tables_endpoint is not None:
        _require_url(TABLES_ENDPOINT, tables_endpoint)
    table_name = IDENTITY_TABLE.read(env)

    allowed = TOKEN_ALLOWED_SCOPES.read(env)
    preferred = tuple(s for s in TOKEN_DEFAULT_SCOPES.default if s in allowed) or allowed[:1]
    defaults = TOKEN_DEFAULT_SCOPES.read(env, default=preferred)
    outside = [s for s in defaults if s not in allowed]
    if outside:
        raise TOKEN_DEFAULT_SCOPES.error(f"{', '.join(outside)} not in TOKEN_ALLOWED_SCOPES")
    min_minutes, max_minutes = TOKEN_MIN_MINUTES.read(env), TOKEN_MAX_MINUTES.read(env)
    if not ACS_MIN_MINUTES <= min_minutes <= max_minutes <= ACS_MAX_MINUTES:
        raise TOKEN_MAX_MINUTES.error(
            f"need {ACS_MIN_MINUTES} <= TOKEN_MIN_MINUTES <= TOKEN_MAX_MINUTES <= {ACS_MAX_MINUTES}"
        )
    default_minutes = TOKEN_DEFAULT_MINUTES.read(env, default=max(TOKEN_DEFAULT_MINUTES.default, min_minutes))
    if not min_minutes <= default_minutes <= max_minutes:
        raise TOKEN_DEFAULT_MINUTES.error(f"must be within {min_minutes}..{max_minutes}")
    if problem := issuers.problem(issuer_list, min_minutes=min_minutes, max_minutes=ACS_MAX_MINUTES):
        raise AUTH_ISSUERS.error(problem)

    retention_days = IDENTITY_RETENTION_DAYS.read(env)
    revoke_on_updated = EVENTS_REVOKE_ON_USER_UPDATED.read(env)
    teams_client_app_id = TEAMS_CLIENT_APP_ID.read(env)
    demo_page_enabled = DEMO_PAGE_ENABLED.read(env)
    rate_limit = RATE_LIMIT_PER_MINUTE.read(env)
    storm_protection = STORM_PROTECTION.read(env) == "on"
    user_deleted = EVENTS_USER_DELETED_TYPES.read(env)
    credentials_changed = EVENTS_CREDENTIALS_CHANGED_TYPES.read(env)
    graph_endpoint = GRAPH_ENDPOINT.read(env).rstrip("/")
    graph_notification_url = GRAPH_NOTIFICATION_URL.read(env)

    return Settings(
        auth_mode=auth_mode,
        issuer=issuer or "",  # compared verbatim with `iss`: Entra v1 issuers end in "/"
        audiences=audiences,
        user_claim=AUTH_USER_CLAIM.read(env),
        algorithms=algorithms,
        acs_connection_string=acs_cs,
        acs_endpoint=acs_endpoint,
        tables_connection_string=tables_cs,
        tables_endpoint=tables_endpoint,
        table_name=table_name,
        allowed_scopes=allowed,
        default_scopes=defaults,
        default_minutes=default_minutes,
        min_minutes=min_minutes,
        max_minutes=max_minutes,
        managed_identity_client_id=AZURE_CLIENT_ID.read(env),
        retention_days=retention_days,
        rate_limit_per_minute=rate_limit or None,
        storm_protection=storm_protection,
        revoke_on_graph_user_updated=revoke_on_updated,
        user_deleted_event_types=user_deleted,
        credentials_changed_event_types=credentials_changed,
        teams_client_app_id=teams_client_app_id,
        demo_page_enabled=demo_page_enabled,
        graph_endpoint=graph_endpoint,
        graph_notification_url=graph_notification_url,
        issuer_list=issuer_list,
    )


@cache
def get_settings() -> Settings:
    """The process's settings; a failure is not cached, so fixing the setting and retrying works."""
    return load(os.environ)


def reset_settings() -> None:
    get_settings.cache_clear()
