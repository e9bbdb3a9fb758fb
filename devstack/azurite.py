"""Launching Azurite (Blob, Queue and Table) from the repo's pinned npm package.

HTTPS with the devstack CA and `--oauth basic`, so that both connection strings and managed-identity
bearer tokens work; in memory, so every stack starts empty; never phoning home.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .ca import TlsFiles
from .children import spawn

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_JS = REPO_ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"
ACCOUNT_NAME = "devstoreaccount1"
# Azurite's published, well-known development key: not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteUnavailable(RuntimeError):
    """Node or the Azurite package is missing; the message says how to fix it."""


@dataclass(frozen=True)
class AzuritePorts:
    blob: int
    queue: int
    table: int


def endpoint(port: int) -> str:
    return f"https://127.0.0.1:{port}/{ACCOUNT_NAME}"


def connection_string(ports: AzuritePorts, *, services: tuple[str, ...] = ("Blob", "Queue", "Table")) -> str:
    parts = ["DefaultEndpointsProtocol=https", f"AccountName={ACCOUNT_NAME}", f"AccountKey={ACCOUNT_KEY}"]
    by_name = {"Blob": ports.blob, "Queue": ports.queue, "Table": ports.table}
    parts += [f"{name}Endpoint={endpoint(by_name[name])}" for name in services]
    return ";".join(parts) + ";"


def find_node() -> str:
    node = shutil.which("node")
    if node is None:
        raise AzuriteUnavailable(
            "Node.js is not on PATH: the local stack runs Azurite with Node 20 or newer. "
            "Install Node.js (e.g. `apt-get install nodejs npm`) and run `make run` again."
        )
    if not AZURITE_JS.exists():
        raise AzuriteUnavailable(
            f"Azurite is not installed in {AZURITE_JS.parents[3]}: run `npm ci` (make does it for you)."
        )
    return node


def command(node: str, ports: AzuritePorts, tls: TlsFiles, *, persist_in: Path | None = None) -> list[str]:
    """Azurite's command line: in memory (a fresh stack every time) unless `persist_in` is given."""
    storage = ["--location", str(persist_in)] if persist_in else ["--inMemoryPersistence"]
    return [
        node,
        str(AZURITE_JS),
        "--blobPort",
        str(ports.blob),
        "--queuePort",
        str(ports.queue),
        "--tablePort",
        str(ports.table),
        "--cert",
        str(tls.server_cert),
        "--key",
        str(tls.server_key),
        "--oauth",
        "basic",
        *storage,
        "--disableTelemetry",
        "--skipApiVersionCheck",
        "--silent",
    ]


def start(
    ports: AzuritePorts, tls: TlsFiles, workspace: Path, log_path: Path, *, persist: bool = False
) -> subprocess.Popen:
    """`persist` keeps data in `workspace` across restarts (tests of a Storage outage use it)."""
    node = find_node()
    workspace.mkdir(parents=True, exist_ok=True)
    # cwd: in memory or not, anything Azurite writes stays in the state folder.
    persist_in = workspace if persist else None
    return spawn(command(node, ports, tls, persist_in=persist_in), cwd=workspace, log_path=log_path)
