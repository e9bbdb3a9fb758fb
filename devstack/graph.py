"""A Microsoft Graph stand-in: the change-notification subscriptions API, as Graph answers it.

Only what the token service calls (`shared/graph/`): `POST/GET /v1.0/subscriptions` and
`GET/PATCH/DELETE /v1.0/subscriptions/{id}`, with Graph's status codes (201 created, 200, 204,
404 for an id it does not know) and error body `{"error": {"code", "message", "innerError"}}`
(Microsoft Graph, "Microsoft Graph error responses and resource types"). Rules as Graph documents
them for a subscription on users delivered through Event Grid: `notificationUrl` (and
`lifecycleNotificationUrl`) `EventGrid:?azuresubscriptionid=&resourcegroup=&partnertopic=&location=`
("Receive Microsoft Graph API change events through Azure Event Grid"), an expiry in the future and
at most 41,760 minutes ahead ("subscription resource type"; past it Graph answers 400
`ExtensionError` "Subscription expiration can only be N minutes in the future.", as recorded in
microsoft-graph-docs issue #2988), and an expired subscription is gone. With application
permissions an app sees only the subscriptions it created ("List subscriptions").

Callers need a bearer token from the stack's managed-identity endpoint for
`https://graph.microsoft.com` (verified like the ACS emulator verifies its own: signature, audience,
issuer, lifetime), carrying the app role `User.Read.All` that Graph requires for subscriptions on
users: none is 401 `InvalidAuthenticationToken`, no role 403 `Authorization_RequestDenied`.

Test hooks under `/_graph/` (no auth, loopback only, never faulted): `GET subscriptions` (all of
them, whoever created them), `PATCH subscriptions/{id}` (set `expirationDateTime` as Graph's clock
would see it), `DELETE subscriptions/{id}` (Graph removed it), `GET stats`, `POST faults`
(`{"failWith": 503|429|403|..., "retryAfterSeconds": n}`: every API request fails so, before any
state changes; `null` clears) and `POST reset`.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import jwt
from aiohttp import web

from .hooks import hook_body, require_loopback
from .signing import SigningKey

HOOKS = "Graph stand-in hooks"  # as their 403 names them (devstack/hooks.py)
GRAPH_AUDIENCES = (
    "https://graph.microsoft.com",
    "https://graph.microsoft.com/",
    "00000003-0000-0000-c000-000000000000",  # Microsoft Graph's application id
)
REQUIRED_ROLES = ("User.Read.All", "Directory.Read.All")  # either lets an app subscribe to users
MAX_MINUTES = 41760  # users, groups and other directory resources
CHANGE_TYPES = ("created", "updated", "deleted")
EVENT_GRID_PARAMETERS = ("azuresubscriptionid", "resourcegroup", "partnertopic", "location")
CONTEXT = "https://graph.microsoft.com/v1.0/$metadata#subscriptions"
ERROR_TEXT = {
    400: ("BadRequest", "The request is malformed."),
    401: ("InvalidAuthenticationToken", "Access token validation failure."),
    403: ("Authorization_RequestDenied", "Insufficient privileges to complete the operation."),
    404: ("ResourceNotFound", "Resource not found."),
    429: ("TooManyRequests", "Too many requests."),
    500: ("InternalServerError", "An internal server error occurred."),
    503: ("ServiceNotAvailable", "The service is temporarily unavailable."),
}


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def response(self) -> web.Response:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        request_id = str(uuid.uuid4())
        body = {
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {"date": now, "request-id": request_id, "client-request-id": request_id},
            }
        }
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(body, status=self.status, headers=headers)


def _stamp(value: dt.datetime) -> str:
    """As Graph writes times: seven fractional digits and Z."""
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond:06d}0Z"


@dataclass
class Subscription:
    id: str
    resource: str
    change_type: str
    notification_url: str
    lifecycle_notification_url: str | None
    expires_at: dt.datetime
    client_state: str | None
    application_id: str
    creator_id: str

    def to_json(self) -> dict:
        return {
            "@odata.context": f"{CONTEXT}/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.application_id,
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": self.lifecycle_notification_url,
            "expirationDateTime": _stamp(self.expires_at),
            "creatorId": self.creator_id,
            "includeResourceData": False,
            "latestSupportedTlsVersion": "v1_2",
            "encryptionCertificate": None,
            "encryptionCertificateId": None,
            "notificationUrlAppId": None,
        }


@dataclass
class Faults:
    # camelCase: the hook's JSON names, as the ACS emulator's faults are
    failWith: int | None = None
    retryAfterSeconds: int | None = None

    def update(self, body: dict) -> None:
        fail = body.get("failWith", self.failWith)
        retry = body.get("retryAfterSeconds", self.retryAfterSeconds)
        if fail is not None and (not isinstance(fail, int) or not 400 <= fail <= 599):
            raise ValueError("failWith must be an HTTP error status (400..599) or null")
        if retry is not None and (not isinstance(retry, int) or retry < 0):
            raise ValueError("retryAfterSeconds must be a non-negative integer or null")
        self.failWith, self.retryAfterSeconds = fail, retry


@dataclass
class GraphState:
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    faults: Faults = field(default_factory=Faults)

    def live(self, now: dt.datetime) -> dict[str, Subscription]:
        """Expired subscriptions are gone, as in Graph (it deletes them)."""
        for sid in [s.id for s in self.subscriptions.values() if s.expires_at <= now]:
            del self.subscriptions[sid]
        return self.subscriptions


def _bad(message: str, code: str = "InvalidRequest") -> GraphError:
    return GraphError(400, code, message)


def _check_event_grid_url(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.lower().startswith("eventgrid:?"):
        raise _bad(f"{name} must be an EventGrid:? address (this stand-in delivers through Event Grid only).")
    given = {k.lower(): v for k, v in parse_qsl(value.split("?", 1)[1]) if v}
    missing = [p for p in EVENT_GRID_PARAMETERS if p not in given]
    if missing:
        raise _bad(f"{name} lacks {', '.join(missing)}.")
    return value


def _expiry(value: object, now: dt.datetime) -> dt.datetime:
    if not isinstance(value, str):
        raise _bad("expirationDateTime is a required property for subscription creation.")
    try:
        expires = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _bad(f"Invalid value '{value[:64]}' for expirationDateTime.") from None
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    if expires <= now:
        raise _bad("Subscription expiration must be in the future.", code="ExtensionError")
    if expires > now + dt.timedelta(minutes=MAX_MINUTES):
        raise _bad(
            f"Subscription expiration can only be {MAX_MINUTES} minutes in the future.", code="ExtensionError"
        )
    return expires


class GraphStandIn:
    def __init__(
        self,
        *,
        managed_identity_key: SigningKey,
        managed_identity_issuer_prefix: str = "https://sts.windows.net/",
    ) -> None:
        self.key = managed_identity_key
        self.issuer_prefix = managed_identity_issuer_prefix
        self.state = GraphState()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/_graph/subscriptions", self.hook_list)
        app.router.add_patch("/_graph/subscriptions/{id}", self.hook_set_expiry)
        app.router.add_delete("/_graph/subscriptions/{id}", self.hook_remove)
        app.router.add_get("/_graph/stats", self.hook_stats)
        app.router.add_post("/_graph/faults", self.hook_faults)
        app.router.add_post("/_graph/reset", self.hook_reset)
        app.router.add_post("/v1.0/subscriptions", self._api("createSubscription", self.create))
        app.router.add_get("/v1.0/subscriptions", self._api("listSubscriptions", self.list))
        app.router.add_get("/v1.0/subscriptions/{id}", self._api("getSubscription", self.get))
        app.router.add_patch("/v1.0/subscriptions/{id}", self._api("updateSubscription", self.update))
        app.router.add_delete("/v1.0/subscriptions/{id}", self._api("deleteSubscription", self.delete))
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    # ---- the API ----------------------------------------------------------------------------------

    def _api(self, operation: str, handler):
        """Count, fault, authenticate, then act: faults strike before any state changes."""

        async def serve(request: web.Request) -> web.Response:
            self.state.calls[operation] += 1
            faults = self.state.faults
            try:
                if faults.failWith is not None:
                    code, message = ERROR_TEXT.get(faults.failWith, ("UnknownError", "Injected failure."))
                    retry = faults.retryAfterSeconds if faults.failWith in (429, 503) else None
                    raise GraphError(faults.failWith, code, message, retry)
                caller = self._authenticate(request)
                return await handler(request, caller, dt.datetime.now(dt.UTC))
            except GraphError as err:
                return err.response()

        return serve

    async def not_found(self, request: web.Request) -> web.Response:
        return GraphError(404, "UnknownError", "The stand-in serves /v1.0/subscriptions only.").response()

    def _authenticate(self, request: web.Request) -> dict:
        authorization = request.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else ""
        if not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            claims = jwt.decode(
                token,
                self.key.public_key,
                algorithms=["RS256"],
                audience=list(GRAPH_AUDIENCES),
                options={"require": ["exp", "nbf", "iat", "iss", "aud"]},
            )
        except jwt.InvalidAudienceError:
            raise GraphError(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience."
            ) from None
        except jwt.PyJWTError:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.") from None
        if not str(claims["iss"]).startswith(self.issuer_prefix):
            raise GraphError(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid issuer."
            )
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not any(role in roles for role in REQUIRED_ROLES):
            raise GraphError(403, "Authorization_RequestDenied", ERROR_TEXT[403][1])
        return claims

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        if not raw:
            raise _bad("Empty Payload. JSON content expected.", code="BadRequest")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad("Unable to read JSON request payload.", code="BadRequest") from None
        if not isinstance(body, dict):
            raise _bad("Unable to read JSON request payload.", code="BadRequest")
        return body

    def _find(self, request: web.Request, now: dt.datetime) -> Subscription:
        sid = request.match_info["id"]
        found = self.state.live(now).get(sid)
        if found is None:
            raise GraphError(
                404,
                "ResourceNotFound",
                f"Resource '{sid[:64]}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        return found

    async def create(self, request: web.Request, caller: dict, now: dt.datetime) -> web.Response:
        body = await self._body(request)
        for name in ("changeType", "notificationUrl", "resource", "expirationDateTime"):
            if body.get(name) in (None, ""):
                raise _bad(f"{name} is a required property for subscription creation.")
        resource = body["resource"]
        if not isinstance(resource, str) or resource.strip("/").lower() != "users":
            raise _bad("This stand-in supports subscriptions on users only.")
        change_type = body["changeType"]
        kinds = [c.strip().lower() for c in change_type.split(",")] if isinstance(change_type, str) else [""]
        if not kinds or any(kind not in CHANGE_TYPES for kind in kinds):
            raise _bad(f"Invalid changeType '{str(change_type)[:64]}'; use {', '.join(CHANGE_TYPES)}.")
        notification_url = _check_event_grid_url("notificationUrl", body["notificationUrl"])
        lifecycle_url = body.get("lifecycleNotificationUrl")
        if lifecycle_url is not None:
            _check_event_grid_url("lifecycleNotificationUrl", lifecycle_url)
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > 128):
            raise _bad("clientState must be a string of at most 128 characters.")
        subscription = Subscription(
            id=str(uuid.uuid4()),
            resource=resource,
            change_type=change_type,
            notification_url=notification_url,
            lifecycle_notification_url=lifecycle_url,
            expires_at=_expiry(body["expirationDateTime"], now),
            client_state=client_state,
            application_id=str(caller.get("appid", "")),
            creator_id=str(caller.get("oid", "")),
        )
        self.state.live(now)[subscription.id] = subscription
        return web.json_response(subscription.to_json(), status=201)

    async def list(self, request: web.Request, caller: dict, now: dt.datetime) -> web.Response:
        own = [s.to_json() for s in self.state.live(now).values() if s.application_id == caller.get("appid")]
        for item in own:
            item.pop("@odata.context")
        return web.json_response({"@odata.context": CONTEXT, "value": own})

    async def get(self, request: web.Request, caller: dict, now: dt.datetime) -> web.Response:
        return web.json_response(self._find(request, now).to_json())

    async def update(self, request: web.Request, caller: dict, now: dt.datetime) -> web.Response:
        subscription = self._find(request, now)
        body = await self._body(request)
        expires = _expiry(body["expirationDateTime"], now) if "expirationDateTime" in body else None
        notification_url = body.get("notificationUrl")
        if notification_url is not None:
            _check_event_grid_url("notificationUrl", notification_url)
        if expires is not None:
            subscription.expires_at = expires
        if notification_url is not None:
            subscription.notification_url = notification_url
        return web.json_response(subscription.to_json())

    async def delete(self, request: web.Request, caller: dict, now: dt.datetime) -> web.Response:
        del self.state.subscriptions[self._find(request, now).id]
        return web.Response(status=204)

    # ---- test hooks: no auth, loopback only, never faulted ---------------------------------------

    async def hook_list(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        now = dt.datetime.now(dt.UTC)
        return web.json_response({"value": [s.to_json() for s in self.state.live(now).values()]})

    async def hook_set_expiry(self, request: web.Request) -> web.Response:
        body = await hook_body(request, HOOKS)
        found = self.state.subscriptions.get(request.match_info["id"])
        if found is None:
            raise web.HTTPNotFound(text="no such subscription")
        try:
            found.expires_at = dt.datetime.fromisoformat(body["expirationDateTime"]).astimezone(dt.UTC)
        except (KeyError, TypeError, ValueError):
            raise web.HTTPBadRequest(text="expirationDateTime must be an ISO 8601 date-time") from None
        return web.json_response(found.to_json())

    async def hook_remove(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        if self.state.subscriptions.pop(request.match_info["id"], None) is None:
            raise web.HTTPNotFound(text="no such subscription")
        return web.Response(status=204)

    async def hook_stats(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        now = dt.datetime.now(dt.UTC)
        return web.json_response(
            {"calls": dict(self.state.calls), "liveSubscriptions": len(self.state.live(now))}
        )

    async def hook_faults(self, request: web.Request) -> web.Response:
        body = await hook_body(request, HOOKS)
        try:
            self.state.faults.update(body)
        except ValueError as err:
            return web.json_response({"error": {"code": "ValidationError", "message": str(err)}}, status=400)
        return web.json_response(vars(self.state.faults))

    async def hook_reset(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        self.state = GraphState()
        return web.json_response({"calls": {}, "liveSubscriptions": 0})
