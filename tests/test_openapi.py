"""openapi.yaml is the contract: it matches the registered functions and the running service."""

from __future__ import annotations

import pytest
import requests
import yaml

import function_app
from devstack.host_functions import index
from devstack.service_settings import REPO_ROOT
from devstack.worker import metadata_of
from shared.errors import Code
from shared.http.openapi import DOCUMENT

SPEC = yaml.safe_load(DOCUMENT.read_text())
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "options", "head"}


def _indexed(metadata=None):
    """The app as the Functions host sees it: the worker runtime's metadata, through the host's rules."""
    metadata = metadata or metadata_of(function_app.app, str(REPO_ROOT))
    return index(metadata, {"CLEANUP_SCHEDULE": "0 */5 * * * *"})


def _registered() -> set[tuple[str, str]]:
    found = set()
    for function in _indexed().http:
        path = "/" + function.route.template
        for method in function.methods or HTTP_METHODS:
            found.add((method.lower(), path))
    return found


def _documented() -> set[tuple[str, str]]:
    return {(m, p) for p, item in SPEC["paths"].items() for m in item if m in HTTP_METHODS}


def test_document_is_openapi_3_1_with_problem_errors():
    assert SPEC["openapi"].startswith("3.1")
    assert set(SPEC["components"]["securitySchemes"]) == {"bearer", "functionKeyHeader", "functionKeyQuery"}
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                ref = response.get("$ref", "")
                if status.startswith(("4", "5")) and ref and not ref.endswith("/Health"):
                    resolved = SPEC["components"]["responses"][ref.rsplit("/", 1)[1]]
                    assert "application/problem+json" in resolved["content"], (path, method, status)


def test_every_registered_route_is_documented_and_nothing_else():
    assert _registered() == _documented()


def test_the_host_loads_every_function():
    """No function in error: e.g. the host refuses any route that begins with "admin" or "runtime"
    (ScriptHost.ValidateHttpFunction), which is why the admin routes live under /manage."""
    metadata = metadata_of(function_app.app, str(REPO_ROOT))
    functions = _indexed(metadata)
    assert functions.errors == {} and functions.skipped == {}
    assert len(metadata) == 14 and {f.name for f in functions.loaded} == {m.name for m in metadata}
    registered = {path for _method, path in _registered()}
    assert "/manage/identities/{communicationUserId}/revoke" in registered


def test_served_document_equals_the_file(stack):
    served = requests.get(f"{stack['api']}/openapi.json", timeout=30)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.json() == SPEC


def test_documented_error_codes_exist_in_the_code():
    """Every `code` the README and the contract name is one the service can answer with (`Code`)."""
    for code in (
        "invalid_json",
        "unknown_scope",
        "scope_not_allowed",
        "invalid_expiry",
        "identity_not_found",
        "unauthenticated",
        "forbidden",
        "configuration_error",
        "acs_unavailable",
        "acs_throttled",
    ):
        assert Code(code) == code, code


@pytest.mark.parametrize("path", sorted(SPEC["paths"]))
def test_paths_have_operation_ids(path):
    for method, operation in SPEC["paths"][path].items():
        if method in HTTP_METHODS:
            assert operation.get("operationId"), (path, method)
