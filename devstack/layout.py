"""Names, files and default ports of the local stack.

Kept apart from stack.py so that the command line can build its parser without importing aiohttp:
the dev host must put the app settings (SSL_CERT_FILE among them) in its environment before
aiohttp is first imported, because aiohttp reads that variable only once, at import.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_STATE_DIR = Path(".devstack")
STATE_ENV = "DEVSTACK_STATE"  # points every `python -m devstack` command (and make) at another state dir
STATE_MARKER = ".devstack-state"
ISSUER_KEY_FILE = "issuer-key.pem"
# The other dev issuers' keys (devstack/issuer.py), by the name `python -m devstack token --issuer` takes.
ISSUER_KEY_FILES = {
    "dev": ISSUER_KEY_FILE,
    "entra": "issuer-entra-key.pem",
    "second": "issuer-second-key.pem",
}
ENV_FILE = "env.json"
HOST_LOG_FILE = "host.log"
DEFAULT_AUDIENCE = "api://acs-token-service"
DEFAULT_FUNCTION_APP = "function_app.py"  # the script the worker indexes, in its app folder


@dataclass
class Ports:
    """Default ports, as in ARCHITECTURE.md; 0 means pick a free one."""

    acs: int = 8443
    issuer: int = 8444
    msi: int = 8445
    graph: int = 8446
    blob: int = 10000
    queue: int = 10001
    table: int = 10002
    host: int = 7071

    LABELS = {
        "acs": "ACS Identity emulator",
        "issuer": "dev OpenID issuer",
        "msi": "managed-identity endpoint",
        "graph": "Microsoft Graph stand-in",
        "blob": "Azurite Blob",
        "queue": "Azurite Queue",
        "table": "Azurite Table",
        "host": "dev host (the function app)",
    }

    @classmethod
    def free(cls) -> Ports:
        return cls(**{f.name: 0 for f in fields(cls)})


# How `devstack up` hands the dev host what is not an app setting: environment variables, because
# a command line is visible to every user of the machine and the function key is a secret.
FUNCTION_KEY_ENV = "DEVHOST_FUNCTION_KEY"  # the function key of every function
HOST_KEY_ENV = "DEVHOST_HOST_KEY"  # the host's default key: any function
MASTER_KEY_ENV = "DEVHOST_MASTER_KEY"  # the master key: any function and the host's /admin API
CORS_ENV = "DEVHOST_CORS"
CORS_CREDENTIALS_ENV = "DEVHOST_CORS_CREDENTIALS"
DEV_SIGNIN_ENV = "DEVHOST_DEV_SIGNIN"  # JSON: the issuer key's path etc. (dev_signin.py); never the key
