"""App settings, read and validated once, on first use.

Importing function_app must do no I/O and need no setting (the Functions host indexes it before
anything else), so nothing here runs at import. A bad or missing setting raises SettingError
naming it; every route but health then answers 503 with that name.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlparse

from .errors import SettingError

SCOPES = ("chat", "voip", "chat.join", "chat.join.limited", "voip.join")
ACS_MIN_MINUTES, ACS_MAX_MINUTES = 60, 1440
# Asymmetric algorithms only: HS* with a public key as secret, and "none", are classic JWT attacks.
SAFE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
GRAPH_ENDPOINT = "https://graph.microsoft.com"  # Microsoft Graph, global cloud
# The partner-topic address Graph delivers to ("Receive Microsoft Graph API change events through
# Azure Event Grid", Microsoft Learn): these four query parameters, all required.
GRAPH_EVENT_GRID_PARAMETERS = ("azuresubscriptionid", "resourcegroup", "partnertopic", "location")
# Set by App Service, never by the operator: "True" while App Service Authentication is on.
PLATFORM_AUTH_SETTING = "WEBSITE_AUTH_ENABLED"


@dataclass(frozen=True)
class Settings:
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
    retention_days: int = 90
    rate_limit_per_minute: int | None = None  # None: off (local default); infra turns it on
    revoke_on_graph_user_updated: bool = True
    user_deleted_event_types: tuple[str, ...] = ()
    credentials_changed_event_types: tuple[str, ...] = ()
    teams_client_app_id: str | None = None  # TEAMS_CLIENT_APP_ID; POST /api/teams/token needs it
    demo_page_enabled: bool = False
    graph_endpoint: str = GRAPH_ENDPOINT  # GRAPH_ENDPOINT: where the Graph subscription is renewed
    graph_notification_url: str | None = None  # GRAPH_NOTIFICATION_URL: set = create it too (graph.py)

    @property
    def object_id_issuer(self) -> str | None:
        """The issuer whose users are keyed by their Entra object id, if they are.

        With JWT validation and AUTH_USER_CLAIM=oid a user's key is user_key(issuer, oid): a
        Microsoft Graph event, which names users by object id, finds the mapping directly, so first
        issues need no Graph lookup row. Easy Auth passes the issuer per request, so it can't tell.
        """
        return self.issuer if self.auth_mode == "jwt" and self.user_claim == "oid" else None


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = _get(env, name)
    if value is None:
        return default
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise SettingError(name, "must list at least one value")
    return items


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _get(env, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingError(name, f"must be an integer, not {value!r}") from None


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(name: str, value: str, *, allow_http_loopback: bool = False) -> str:
    url = urlparse(value)
    if url.scheme == "https" and url.hostname:
        return value
    if url.scheme == "http" and allow_http_loopback and _is_loopback(url.hostname):
        return value
    raise SettingError(
        name, "must be an https URL" + (" (http only on loopback)" if allow_http_loopback else "")
    )


def _platform_authentication_on(env: Mapping[str, str]) -> bool:
    """Whether App Service Authentication is on, which alone makes X-MS-CLIENT-PRINCIPAL trustworthy.

    The platform strips client-sent X-MS-CLIENT-* headers only when the feature is on, and then
    injects WEBSITE_AUTH_ENABLED=True (Microsoft Learn: "Work with user identities in Azure App
    Service authentication"; "Environment variables and app settings in Azure App Service").
    """
    return (_get(env, PLATFORM_AUTH_SETTING) or "").lower() == "true"


def _graph(env: Mapping[str, str]) -> dict:
    """GRAPH_ENDPOINT (https) and GRAPH_NOTIFICATION_URL (an `EventGrid:?...` partner-topic address)."""
    endpoint = _check_url("GRAPH_ENDPOINT", _get(env, "GRAPH_ENDPOINT") or GRAPH_ENDPOINT).rstrip("/")
    url = _get(env, "GRAPH_NOTIFICATION_URL")
    if url is not None:
        scheme, _, query = url.partition(":?")
        given = {k.lower(): v for k, _, v in (p.partition("=") for p in query.split("&")) if v}
        missing = [name for name in GRAPH_EVENT_GRID_PARAMETERS if name not in given]
        if scheme.lower() != "eventgrid" or missing:
            raise SettingError(
                "GRAPH_NOTIFICATION_URL",
                "must be EventGrid:?" + "&".join(f"{n}=..." for n in GRAPH_EVENT_GRID_PARAMETERS),
            )
    return {"graph_endpoint": endpoint, "graph_notification_url": url}


def load(env: Mapping[str, str]) -> Settings:
    auth_mode = (_get(env, "AUTH_MODE") or "jwt").lower()
    if auth_mode not in ("jwt", "easyauth"):
        raise SettingError("AUTH_MODE", "must be jwt or easyauth")
    if auth_mode == "easyauth" and not _platform_authentication_on(env):
        raise SettingError(
            "AUTH_MODE",
            "easyauth needs App Service Authentication on (the platform then sets "
            f"{PLATFORM_AUTH_SETTING}=True); without it any caller can forge X-MS-CLIENT-PRINCIPAL",
        )
    issuer = _get(env, "AUTH_ISSUER")
    audiences = _list(env, "AUTH_AUDIENCE", ())
    if auth_mode == "jwt":
        if issuer is None:
            raise SettingError("AUTH_ISSUER", "is required: the OpenID Connect issuer of your app's users")
        _check_url("AUTH_ISSUER", issuer, allow_http_loopback=True)
        if not audiences:
            raise SettingError(
                "AUTH_AUDIENCE", "is required: the audience (client id or App ID URI) of your API"
            )
    algorithms = _list(env, "AUTH_ALGORITHMS", ("RS256",))
    unsafe = [a for a in algorithms if a not in SAFE_ALGORITHMS]
    if unsafe:
        raise SettingError(
            "AUTH_ALGORITHMS", f"{', '.join(unsafe)} not allowed; use {', '.join(SAFE_ALGORITHMS)}"
        )

    acs_cs, acs_endpoint = _get(env, "ACS_CONNECTION_STRING"), _get(env, "ACS_ENDPOINT")
    if acs_cs is None and acs_endpoint is None:
        raise SettingError("ACS_ENDPOINT", "is required (or ACS_CONNECTION_STRING, which holds a key)")
    if acs_cs is not None and ("endpoint=" not in acs_cs.lower() or "accesskey=" not in acs_cs.lower()):
        raise SettingError("ACS_CONNECTION_STRING", "must look like endpoint=https://...;accesskey=...")
    if acs_cs is None and acs_endpoint is not None:
        _check_url("ACS_ENDPOINT", acs_endpoint)

    tables_cs, tables_endpoint = _get(env, "TABLES_CONNECTION_STRING"), _get(env, "TABLES_ENDPOINT")
    if tables_cs is None and tables_endpoint is None:
        raise SettingError("TABLES_ENDPOINT", "is required (or TABLES_CONNECTION_STRING, which holds a key)")
    if tables_cs is None and tables_endpoint is not None:
        _check_url("TABLES_ENDPOINT", tables_endpoint)
    table_name = _get(env, "IDENTITY_TABLE") or "acsidentities"
    if not (3 <= len(table_name) <= 63 and table_name.isalnum() and table_name[0].isalpha()):
        raise SettingError("IDENTITY_TABLE", "must be 3-63 letters and digits, starting with a letter")

    allowed = _list(env, "TOKEN_ALLOWED_SCOPES", SCOPES)
    unknown = [s for s in allowed if s not in SCOPES]
    if unknown:
        raise SettingError(
            "TOKEN_ALLOWED_SCOPES", f"unknown scopes {', '.join(unknown)}; known: {', '.join(SCOPES)}"
        )
    defaults = _list(
        env, "TOKEN_DEFAULT_SCOPES", tuple(s for s in ("chat", "voip") if s in allowed) or allowed[:1]
    )
    outside = [s for s in defaults if s not in allowed]
    if outside:
        raise SettingError("TOKEN_DEFAULT_SCOPES", f"{', '.join(outside)} not in TOKEN_ALLOWED_SCOPES")

    min_minutes = _int(env, "TOKEN_MIN_MINUTES", ACS_MIN_MINUTES)
    max_minutes = _int(env, "TOKEN_MAX_MINUTES", ACS_MAX_MINUTES)
    if not ACS_MIN_MINUTES <= min_minutes <= max_minutes <= ACS_MAX_MINUTES:
        raise SettingError(
            "TOKEN_MAX_MINUTES",
            f"need {ACS_MIN_MINUTES} <= TOKEN_MIN_MINUTES <= TOKEN_MAX_MINUTES <= {ACS_MAX_MINUTES}",
        )
    default_minutes = _int(env, "TOKEN_DEFAULT_MINUTES", max(60, min_minutes))
    if not min_minutes <= default_minutes <= max_minutes:
        raise SettingError("TOKEN_DEFAULT_MINUTES", f"must be within {min_minutes}..{max_minutes}")

    retention_days = _int(env, "IDENTITY_RETENTION_DAYS", 90)
    if not 1 <= retention_days <= 3650:
        raise SettingError("IDENTITY_RETENTION_DAYS", "must be from 1 to 3650")
    revoke_on_updated = (_get(env, "EVENTS_REVOKE_ON_USER_UPDATED") or "true").lower()
    if revoke_on_updated not in ("true", "false"):
        raise SettingError("EVENTS_REVOKE_ON_USER_UPDATED", "must be true or false")
    teams_client_app_id = _get(env, "TEAMS_CLIENT_APP_ID")
    if teams_client_app_id is not None and not _is_guid(teams_client_app_id):
        raise SettingError("TEAMS_CLIENT_APP_ID", "must be the Entra application (client) id, a GUID")
    demo_page = (_get(env, "DEMO_PAGE_ENABLED") or "false").lower()
    if demo_page not in ("true", "false"):
        raise SettingError("DEMO_PAGE_ENABLED", "must be true or false")

    rate_limit = _int(env, "RATE_LIMIT_PER_MINUTE", 0)
    if not 0 <= rate_limit <= 100_000:
        raise SettingError("RATE_LIMIT_PER_MINUTE", "must be from 0 (off) to 100000")

    return Settings(
        rate_limit_per_minute=rate_limit or None,
        retention_days=retention_days,
        revoke_on_graph_user_updated=revoke_on_updated == "true",
        user_deleted_event_types=_list(env, "EVENTS_USER_DELETED_TYPES", ()),
        credentials_changed_event_types=_list(env, "EVENTS_CREDENTIALS_CHANGED_TYPES", ()),
        auth_mode=auth_mode,
        issuer=issuer or "",  # compared verbatim with `iss`: Entra v1 issuers end in "/"
        audiences=audiences,
        user_claim=_get(env, "AUTH_USER_CLAIM") or "sub",
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
        managed_identity_client_id=_get(env, "AZURE_CLIENT_ID"),
        teams_client_app_id=teams_client_app_id,
        demo_page_enabled=demo_page == "true",
        **_graph(env),
    )


@cache
def get_settings() -> Settings:
    """The process's settings; a failure is not cached, so fixing the setting and retrying works."""
    return load(os.environ)


def reset_settings() -> None:
    get_settings.cache_clear()
