"""Launching the dev host (`python -m devstack host`) as a child of `devstack up`.

A process of its own, not a task on the stack's loop: the service must not share the emulator's
event loop (a blocking call there would stall the emulator too, and hide it), and aiohttp in the
service must read the stack's CA from SSL_CERT_FILE at import. Like Azurite, it gets its own
process group and a parent-death signal, and its output goes to `.devstack/host.log`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .children import spawn
from .layout import (
    CORS_CREDENTIALS_ENV,
    CORS_ENV,
    DEFAULT_FUNCTION_APP,
    DEV_SIGNIN_ENV,
    FUNCTION_KEY_ENV,
    HOST_KEY_ENV,
    MASTER_KEY_ENV,
)
from .service_settings import REPO_ROOT, settings_for_host


def environment(
    env: dict,
    *,
    function_key: str,
    host_key: str,
    master_key: str,
    local_settings: dict,
    base: Mapping[str, str] | None = None,
    dev_signin: str | None = None,
) -> dict[str, str]:
    """os.environ, then the service's app settings for this stack, then the host's own config.

    `dev_signin`: DevSignin.config(...), which turns on the demo page's dev sign-in route.
    """
    host_section = local_settings.get("Host") or {}
    return {
        **(os.environ if base is None else base),
        **settings_for_host(env, local_settings=local_settings),
        FUNCTION_KEY_ENV: function_key,
        HOST_KEY_ENV: host_key,
        MASTER_KEY_ENV: master_key,
        CORS_ENV: str(host_section.get("CORS") or ""),
        CORS_CREDENTIALS_ENV: str(host_section.get("CORSCredentials", False)).lower(),
        "PYTHONUNBUFFERED": "1",
        **({DEV_SIGNIN_ENV: dev_signin} if dev_signin else {}),
    }


def command(port: int, app_spec: str = DEFAULT_FUNCTION_APP) -> list[str]:
    # --no-settings: the parent already merged local.settings.json into the environment, and
    # dropped what must not be there (connection strings, when managed identity is used).
    return [sys.executable, "-m", "devstack", "host", "--port", str(port), "--app", app_spec, "--no-settings"]


def start(port: int, app_spec: str, environment: dict[str, str], log_path: Path) -> subprocess.Popen:
    # cwd: the repository, for `python -m devstack`; the host gives its worker the app's folder.
    return spawn(command(port, app_spec), cwd=REPO_ROOT, log_path=log_path, env=environment)
