"""What the Functions host makes of the worker's function metadata: routes, timers, and refusals.

The worker indexes the app and answers with one RpcFunctionMetadata a function, its bindings as
function.json-style JSON (`raw_bindings`). The host turns those into HTTP routes and timer
schedules and validates each function on the way, in the worker's order, as ScriptHost does
(Azure/azure-functions-host, src/WebJobs.Script/Host/ScriptHost.cs, ValidateFunction and
ValidateHttpFunction): a function it refuses is "in error", is not loaded, and its route answers
404; the rest of the app runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .ncrontab import CronSchedule, resolve_settings
from .routes import RouteTemplate

RESERVED_ROUTE_PREFIXES = ("admin", "runtime")  # the host's own API lives under /admin
RESERVED_ROUTE_ERROR = "The specified route conflicts with one or more built in routes."
AUTH_LEVELS = ("anonymous", "user", "function", "system", "admin")  # AuthorizationLevel, weakest first
# Utility.FunctionNameValidationRegex and BindingNameValidationRegex (WebJobs.Script/Utility.cs):
# no underscore in a binding name, so `arg_name="my_timer"` fails to load in Azure.
FUNCTION_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,127}$(?<!^host$)", re.IGNORECASE)
BINDING_NAME = re.compile(r"^([a-zA-Z][a-zA-Z0-9]{0,127}|\$return)$")


class FunctionInError(ValueError):
    """The host refuses this function; the message is the host's own words."""


@dataclass(frozen=True)
class HttpFunction:
    name: str
    function_id: str
    route: RouteTemplate
    methods: tuple[str, ...] | None  # None: every method, as when the trigger names none
    auth_level: str  # one of AUTH_LEVELS
    arg_name: str


@dataclass(frozen=True)
class TimerFunction:
    name: str
    function_id: str
    schedule: CronSchedule
    run_on_startup: bool
    arg_name: str


@dataclass
class Functions:
    """The indexed app: what to load, what to route, and the functions in error with the reasons."""

    http: list[HttpFunction] = field(default_factory=list)
    timers: list[TimerFunction] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # triggers the dev host does not run

    @property
    def loaded(self) -> list[HttpFunction | TimerFunction]:
        return [*self.http, *self.timers]

    def by_name(self, name: str) -> HttpFunction | TimerFunction | None:
        return next((f for f in self.loaded if f.name.lower() == name.lower()), None)


def validate_names(name: str, bindings: list[dict[str, Any]]) -> None:
    """WorkerFunctionMetadataProvider.ValidateMetadata: the function's and every binding's name."""
    if not FUNCTION_NAME.match(name):
        raise FunctionInError(f"'{name}' is not a valid function name.")
    if not bindings:
        raise FunctionInError("At least one binding must be declared.")
    seen: set[str] = set()
    for binding in bindings:
        binding_name = binding.get("name")
        if not isinstance(binding_name, str) or not BINDING_NAME.match(binding_name):
            raise FunctionInError(
                f"The binding name {binding_name} is invalid. Please assign a valid name to the binding."
            )
        if binding_name.lower() in seen:
            raise FunctionInError(
                f"Multiple bindings with name '{binding_name}' discovered. Binding names must be unique."
            )
        seen.add(binding_name.lower())


def _trigger(bindings: list[dict[str, Any]]) -> dict[str, Any]:
    for binding in bindings:
        if str(binding.get("type", "")).lower().endswith("trigger"):
            return binding
    raise FunctionInError("No trigger binding specified. A function must have a trigger input binding.")


def validate_http_route(route: str) -> None:
    """ScriptHost.ValidateHttpFunction: the host's own route space is off limits."""
    if route.strip("/").lower().startswith(RESERVED_ROUTE_PREFIXES):
        raise FunctionInError(RESERVED_ROUTE_ERROR)


def routes_conflict(route: str, methods: tuple[str, ...] | None, other: HttpFunction) -> bool:
    """ScriptHost.HttpRoutesConflict: the same template (case-insensitively) and a method in common.

    A trigger without methods accepts every method, so it conflicts with any other on its route.
    """
    if route.strip("/").lower() != other.route.template.strip("/").lower():
        return False
    if not methods or not other.methods:
        return True
    return bool(set(methods) & set(other.methods))


def _http_function(name: str, function_id: str, trigger: dict[str, Any], known: Functions) -> HttpFunction:
    route = trigger.get("route") or name  # no route: the function's name, as in the host
    validate_http_route(route)
    methods = tuple(str(m) for m in trigger["methods"]) if trigger.get("methods") else None
    for other in known.http:
        if routes_conflict(route, methods, other):
            raise FunctionInError(
                f"The route specified conflicts with the route defined by function '{other.name}'."
            )
    level = str(trigger.get("authLevel") or "function").lower()
    if level not in AUTH_LEVELS:
        raise FunctionInError(f"authLevel '{trigger.get('authLevel')}' is not an AuthorizationLevel.")
    try:
        template = RouteTemplate.parse(route)
    except ValueError as err:
        raise FunctionInError(f"The route template '{route}' is invalid: {err}") from None
    return HttpFunction(name, function_id, template, methods, level, str(trigger["name"]))


def _timer_function(
    name: str, function_id: str, trigger: dict[str, Any], environ: Mapping[str, str] | None
) -> TimerFunction:
    try:
        schedule = CronSchedule.parse(resolve_settings(str(trigger.get("schedule", "")), environ))
    except LookupError as err:
        raise FunctionInError(f"Error indexing method 'Functions.{name}': {err}") from None
    except ValueError as err:
        raise FunctionInError(
            f"The schedule expression '{trigger.get('schedule')}' is invalid: {err}"
        ) from None
    return TimerFunction(name, function_id, schedule, bool(trigger.get("runOnStartup")), str(trigger["name"]))


def index(metadata: list[Any], environ: Mapping[str, str] | None = None) -> Functions:
    """Validate each function in the worker's order; the first of two conflicting routes wins."""
    found = Functions()
    names: set[str] = set()
    for function in metadata:
        name = function.name
        try:
            if name.lower() in names:
                raise FunctionInError(
                    f"The function or proxy name '{name}' must be unique within the function app."
                )
            names.add(name.lower())
            bindings = [json.loads(raw) for raw in function.raw_bindings]
            validate_names(name, bindings)
            trigger = _trigger(bindings)
            kind = str(trigger.get("type", "")).lower()
            if kind == "httptrigger":
                found.http.append(_http_function(name, function.function_id, trigger, found))
            elif kind == "timertrigger":
                found.timers.append(_timer_function(name, function.function_id, trigger, environ))
            else:
                found.skipped[name] = f"the dev host does not run {trigger.get('type')} triggers"
        except FunctionInError as err:
            found.errors.setdefault(name, []).append(str(err))
        except (ValueError, KeyError, TypeError) as err:
            found.errors.setdefault(name, []).append(f"Invalid function metadata: {err!r}")
    return found
