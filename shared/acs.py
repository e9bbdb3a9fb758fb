"""The ACS Identity gateway: the aio SDK client, its retry discipline, and its errors translated.

The gateway, not azure-core, retries ACS's answers (the client's `retry_status` is 0; azure-core
still retries connection failures): every attempt passes the worker's throttle (shared/throttle.py)
and every retry is drawn from its budget, so that random faults are retried while a refusing ACS
is not retried into. With protection on, a Retry-After of ACS's is passed to our caller, never
waited out in the request. A 429 becomes our 429 `acs_throttled`; other failures left when retries
run out become a 503 with Retry-After, never a 500: from the caller's side the service is
temporarily unable, not broken.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from azure.communication.identity import CommunicationUserIdentifier
from azure.communication.identity.aio import CommunicationIdentityClient
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from . import telemetry
from .errors import BadRequest, Code, Forbidden, NotFound, ServiceError, Throttled, Unavailable
from .throttle import CREATE_AND_ISSUE, DELETE, ISSUE, REVOKE, TEAMS_EXCHANGE, Throttle

log = logging.getLogger("acs_token_service.acs")

# The answers worth another try, as azure-core's retry policy has them (RetryPolicyBase.is_retry's
# "safe status code list"); a 429 means ACS did nothing, so any call may be tried again.
RETRIED = frozenset({408, 429, 500, 502, 503, 504})
# A call's retries and the waits before them (jittered down to half, so callers that collided
# spread out): 7.75 s at most in all, well inside an HTTP client's patience. With 30% throttling
# and 10% errors, six retries fail 0.16% of calls (three, azure-core's default, 2.6%).
RETRY_BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0)
# Revocations and deletions try once more, then queue for the timer (the request path's and the
# timer's alike); a probe asks once.
QUEUED_RETRIES = 1
QUEUED_OPTIONS = {"retry_total": QUEUED_RETRIES, "retry_backoff_factor": 0.2}  # azure-core's, per call
# With protection off, a Retry-After is waited out in the request as azure-core does, up to this.
LONGEST_WAIT = 30
# A Retry-After is honoured up to this (s): ACS's windows are 30 s; a day's would stop a worker.
LONGEST_RETRY_AFTER = 300


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_on: dt.datetime


def _parse_expiry(value: object) -> dt.datetime:
    # The SDK passes ACS's expiresOn through as a string (e.g. 2023-10-26T16:19:21.665204+00:00).
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _retry_after_header(err: HttpResponseError) -> int | None:
    """ACS's Retry-After in whole seconds, at most LONGEST_RETRY_AFTER, if it sent one in seconds
    (an HTTP date is not expected); anything else, "inf" or "nan" among it, counts as none."""
    response = getattr(err, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        seconds = float(value) if value else math.nan
    except (ValueError, TypeError):
        return None
    return min(LONGEST_RETRY_AFTER, max(0, math.ceil(seconds))) if math.isfinite(seconds) else None


def _retry_after(err: HttpResponseError, default: int = 5) -> int:
    return _retry_after_header(err) or default


def _teams_rejection(err: HttpResponseError) -> ServiceError:
    """ACS's 400 ValidationErrors for the Teams exchange, told apart by target (as recorded)."""
    error = getattr(err, "error", None)
    target = str(getattr(error, "target", None) or "").lower()
    message = str(getattr(error, "message", None) or "")
    if target == "userid" and "unexpected user" in message:
        return Forbidden(
            "ACS: the Teams token was issued for another user than the caller.", code=Code.TEAMS_USER_MISMATCH
        )
    if target == "userid":  # required or malformed: the caller's oid is no Entra object id
        return Forbidden(
            "Exchanging a Teams token needs an Entra ID bearer token whose oid is the Teams user's "
            "object id.",
            code=Code.CALLER_OID_MISSING,
        )
    if target == "appid" and "not the expected one" in message:
        # ACS: "AAD application is not the expected one."
        return BadRequest("ACS refused the Teams token's application.", code=Code.TEAMS_APP_REJECTED)
    if target == "appid":  # required or malformed: only ever the configured app id
        return BadRequest("ACS refused the configured Teams client app id.", code=Code.TEAMS_APP_INVALID)
    return translate(err)


def _acs_not_found(err: Exception) -> bool:
    """A 404 in ACS's own error format: a proxy's or a wrong URL's 404 carries no ACS error code."""
    code = getattr(getattr(err, "error", None), "code", None)
    return isinstance(err, HttpResponseError) and err.status_code == 404 and bool(code)


def translate(err: Exception) -> ServiceError:
    """Map an SDK failure to what our caller should see."""
    if isinstance(err, ServiceError):  # the throttle's own refusal
        return err
    if isinstance(err, ServiceRequestError | ServiceResponseError):
        return Unavailable("Azure Communication Services cannot be reached.", code=Code.ACS_UNAVAILABLE)
    if isinstance(err, ClientAuthenticationError):
        code = getattr(getattr(err, "error", None), "code", None)
        if code == "IdentityNotOwned":
            return NotFound("The ACS identity no longer exists.", code=Code.IDENTITY_GONE)
        log.error(
            "ACS refused our credentials (%s): check ACS_ENDPOINT/ACS_CONNECTION_STRING and roles", code
        )
        return Unavailable(
            "The service cannot authenticate to ACS.", code=Code.ACS_AUTH_FAILED, retry_after=60
        )
    if isinstance(err, HttpResponseError):
        status = err.status_code or 0
        if status == 429:
            return Throttled("ACS is throttling this service; retry later.", retry_after=_retry_after(err))
        if status >= 500:
            return Unavailable(
                "ACS failed to answer.", code=Code.ACS_UNAVAILABLE, retry_after=_retry_after(err)
            )
        log.error("ACS rejected a request: status %s, code %s", status, getattr(err.error, "code", None))
        return Unavailable("ACS rejected the request.", code=Code.ACS_REJECTED)
    raise err


class AcsGateway:
    def __init__(
        self,
        client: CommunicationIdentityClient,
        throttle: Throttle | None = None,
        backoff: tuple[float, ...] | None = None,
    ) -> None:
        self.client = client
        self.throttle = throttle or Throttle()
        self.backoff = RETRY_BACKOFF_SECONDS if backoff is None else backoff

    async def _call[T](
        self, operation: str, call: Callable[[], Awaitable[T]], *, retries: int | None = None
    ) -> T:
        """Make the call through the throttle, again (from the budget) after an answer worth
        retrying. ACS's last answer is raised as azure-core raised it, for the caller to translate."""
        retries = len(self.backoff) if retries is None else min(retries, len(self.backoff))
        self.throttle.started()
        for attempt in range(retries + 1):
            try:
                probe = self.throttle.admit(operation)
            except Throttled:
                telemetry.acs_refused_here(operation)
                raise
            try:
                result = await call()
            except HttpResponseError as err:
                status, retry_after = err.status_code or 0, _retry_after_header(err)
                throttled = status == 429
                if throttled:
                    telemetry.acs_throttled(retry_after)
                self.throttle.answered(operation, probe, refused=throttled, retry_after=retry_after)
                if status not in RETRIED or attempt == retries:
                    raise
                if throttled and retry_after and self.throttle.enabled:
                    raise  # ACS said when: the caller is told, the throttle refuses until then
                if not self.throttle.may_retry():
                    raise
                delay = random.uniform(self.backoff[attempt] / 2, self.backoff[attempt])
                if throttled and retry_after:  # protection off: waited out, as azure-core did
                    delay = min(retry_after, LONGEST_WAIT)
                await asyncio.sleep(delay)
            except BaseException:  # no answer (unreachable, cancelled, anything else): nothing learnt
                self.throttle.abandoned(operation, probe)
                raise
            else:
                self.throttle.answered(operation, probe, refused=False)
                return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    @telemetry.acs_operation("createIdentity")
    async def create_with_token(self, scopes: tuple[str, ...], minutes: int) -> tuple[str, IssuedToken]:
        try:
            user, token = await self._call(
                CREATE_AND_ISSUE,
                lambda: self.client.create_user_and_token(
                    list(scopes), token_expires_in=dt.timedelta(minutes=minutes)
                ),
            )
        except Exception as err:  # noqa: BLE001 - translate() re-raises what it does not know
            raise translate(err) from None
        return user.properties["id"], IssuedToken(token.token, _parse_expiry(token.expires_on))

    @telemetry.acs_operation("issueAccessToken")
    async def issue(self, communication_user_id: str, scopes: tuple[str, ...], minutes: int) -> IssuedToken:
        try:
            token = await self._call(
                ISSUE,
                lambda: self.client.get_token(
                    CommunicationUserIdentifier(communication_user_id),
                    list(scopes),
                    token_expires_in=dt.timedelta(minutes=minutes),
                ),
            )
        except Exception as err:  # noqa: BLE001
            raise translate(err) from None
        return IssuedToken(token.token, _parse_expiry(token.expires_on))

    @telemetry.acs_operation("issueAccessToken")
    async def exists(self, communication_user_id: str, **options) -> bool:
        """Does ACS still have the identity? ACS has no read of one: issuing a token (never handed
        out) tells, since it fails once the identity is gone. Asked once, through the throttle."""
        try:
            await self._call(
                ISSUE,
                lambda: self.client.get_token(
                    CommunicationUserIdentifier(communication_user_id),
                    ["chat"],
                    token_expires_in=dt.timedelta(minutes=60),
                    **options,
                ),
                retries=0,
            )
        except Exception as err:  # noqa: BLE001
            translated = translate(err)
            if isinstance(translated, NotFound) and translated.code == Code.IDENTITY_GONE:
                return False
            raise translated from None
        return True

    @telemetry.acs_operation("revokeAccessTokens")
    async def revoke(self, communication_user_id: str, **options) -> None:
        """Revoke every token of the identity. `options` are per-call azure-core settings."""
        try:
            await self._call(
                REVOKE,
                lambda: self.client.revoke_tokens(
                    CommunicationUserIdentifier(communication_user_id), **options
                ),
                retries=QUEUED_RETRIES,
            )
        except Exception as err:  # noqa: BLE001
            raise translate(err) from None

    @telemetry.acs_operation("deleteIdentity")
    async def delete(self, communication_user_id: str, **options) -> None:
        """Delete the identity (which revokes its tokens); an identity already gone counts as done."""
        try:
            await self._call(
                DELETE,
                lambda: self.client.delete_user(
                    CommunicationUserIdentifier(communication_user_id), **options
                ),
                retries=QUEUED_RETRIES,
            )
        except Exception as err:  # noqa: BLE001
            if _acs_not_found(err):  # deleted already, in ACS's words: not an error to log
                return
            translated = translate(err)
            if isinstance(translated, NotFound):  # IdentityNotOwned: deleted already
                return
            raise translated from None

    @telemetry.acs_operation("exchangeTeamsToken")
    async def exchange_teams_token(
        self, teams_token: str, client_id: str, user_object_id: str
    ) -> IssuedToken:
        """A Teams user's Entra token for ACS -> an ACS token for that Teams user.

        ACS checks the token first: bad, expired or for another audience is 401 InvalidAccessToken,
        told apart from our own credentials being refused. Then 400 ValidationErrors whose target
        says whose fault it is: `userId` (the token is another user's), `appId` (our app id).
        """
        try:
            token = await self._call(
                TEAMS_EXCHANGE,
                lambda: self.client.get_token_for_teams_user(teams_token, client_id, user_object_id),
            )
        except ClientAuthenticationError as err:
            if getattr(getattr(err, "error", None), "code", None) == "InvalidAccessToken":
                raise BadRequest(
                    "ACS did not accept the Teams access token: it is invalid, expired or not for ACS.",
                    code=Code.TEAMS_TOKEN_INVALID,
                ) from None
            raise translate(err) from None
        except HttpResponseError as err:
            if err.status_code == 400:
                raise _teams_rejection(err) from None
            raise translate(err) from None
        except Exception as err:  # noqa: BLE001
            raise translate(err) from None
        return IssuedToken(token.token, _parse_expiry(token.expires_on))
