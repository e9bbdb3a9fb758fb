"""The app settings the token service gets when it runs on the local stack.

One place maps the stack's env.json onto the service's settings, so that the dev host, `make run`
and the tests configure the service the same way. Values in local.settings.json ("Values") are
the user's; the stack fills in what it alone knows (ports, keys, the CA).
"""

from __future__ import annotations

import json
from pathlib import Path

from shared import settings as app

REPO_ROOT = Path(__file__).resolve().parent.parent
# The Functions host's own settings, which local.settings.json holds beside the app's (app.TABLE).
HOST_SETTINGS = ("FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsStorage")


def read_local_settings(path: Path | None = None) -> dict:
    """local.settings.json if the user made one, else the committed sample."""
    for candidate in (
        (path,) if path else (REPO_ROOT / "local.settings.json", REPO_ROOT / "local.settings.sample.json")
    ):
        if candidate and candidate.exists():
            return json.loads(candidate.read_text())
    return {}


def settings_for_host(
    env: dict, *, managed_identity: bool = True, local_settings: dict | None = None
) -> dict[str, str]:
    """Environment variables for a process that runs function_app against this stack.

    With `managed_identity` the service gets endpoints only and authenticates through the stack's
    App Service-style managed-identity endpoint: no key in any setting.
    """
    values = {k: str(v) for k, v in (local_settings or {}).get("Values", {}).items() if v not in ("", None)}
    stack_values = {
        app.AUTH_ISSUER.name: env["issuer"],
        app.AUTH_AUDIENCE.name: env["audience"],
        "SSL_CERT_FILE": env["ca_bundle"],
        "REQUESTS_CA_BUNDLE": env["ca_bundle"],
        "AzureWebJobsStorage": env["storage_connection_string"],
        # The emulator accepts Teams tokens for this app only, as ACS does for the app you registered.
        app.TEAMS_CLIENT_APP_ID.name: env["teams_app_id"],
    }
    if values.get(app.AUTH_ISSUERS.name):  # several issuers (README): the stack's one stays out
        for single in app.SINGLE_ISSUER:
            stack_values.pop(single.name, None)
            values.pop(single.name, None)
    if "graph_endpoint" in env:  # the Graph stand-in: the service renews its subscription there
        stack_values[app.GRAPH_ENDPOINT.name] = env["graph_endpoint"]
    if managed_identity:
        stack_values |= {
            app.ACS_ENDPOINT.name: env["acs_endpoint"],
            app.TABLES_ENDPOINT.name: env["tables_endpoint"],
            "IDENTITY_ENDPOINT": env["identity_endpoint"],
            "IDENTITY_HEADER": env["identity_header"],
        }
        for key in (app.ACS_CONNECTION_STRING, app.TABLES_CONNECTION_STRING):
            values.pop(key.name, None)
    else:
        stack_values |= {
            app.ACS_CONNECTION_STRING.name: env["acs_connection_string"],
            app.TABLES_CONNECTION_STRING.name: env["tables_connection_string"],
        }
    values.setdefault(app.CLEANUP_SCHEDULE.name, app.CLEANUP_SCHEDULE.default)  # the host needs one
    values.setdefault(app.DEMO_PAGE_ENABLED.name, "true")  # a dev stack: the demo page is on unless off
    return values | stack_values
