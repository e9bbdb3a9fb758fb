"""`python -m devstack up`: start every local stand-in, write `env.json`, stop them all on exit.

One asyncio process serves the ACS emulator, the dev issuer and the managed-identity endpoint;
Azurite runs as a child in its own process group that dies with us. Ports are reserved by binding
them before anything starts, so a taken port fails fast and auto-picked ports cannot be stolen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import aiohttp
from aiohttp import web

from . import azurite
from .acs_emulator import AcsEmulator
from .acs_state import AcsResource, new_resource_id
from .ca import TlsFiles, create_tls_files, load_or_create_tls_files
from .issuer import DEV_TENANT_ID, DevIssuer
from .keys import SigningKey
from .msi import ManagedIdentity, ManagedIdentityEndpoint

DEFAULT_STATE_DIR = Path(".devstack")
STATE_MARKER = ".devstack-state"
ISSUER_KEY_FILE = "issuer-key.pem"
ENV_FILE = "env.json"
DEFAULT_AUDIENCE = "api://acs-token-service"
TEAMS_APP_ID = "1fd5118e-2576-4263-8130-9503064c837a"
READY_TIMEOUT_SECONDS = 60.0


class StackError(RuntimeError):
    """Something stops the stack from starting; the message tells the user what to do."""


@dataclass
class Ports:
    """Default ports, as in ARCHITECTURE.md; 0 means pick a free one."""

    acs: int = 8443
    issuer: int = 8444
    msi: int = 8445
    blob: int = 10000
    queue: int = 10001
    table: int = 10002

    LABELS = {
        "acs": "ACS Identity emulator",
        "issuer": "dev OpenID issuer",
        "msi": "managed-identity endpoint",
        "blob": "Azurite Blob",
        "queue": "Azurite Queue",
        "table": "Azurite Table",
    }

    @classmethod
    def free(cls) -> Ports:
        return cls(**{f.name: 0 for f in fields(cls)})


def _bind(port: int, label: str, flag: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as err:
        sock.close()
        raise StackError(
            f"Port {port} for the {label} is already in use ({err.strerror}). "
            f"Stop whatever holds it (a stack already running?) or pass {flag} PORT (0 picks a free port)."
        ) from None
    return sock


def reserve(ports: Ports) -> dict[str, socket.socket]:
    """Bind every port now; our own servers keep their sockets, Azurite's are released at launch."""
    held: dict[str, socket.socket] = {}
    try:
        for f in fields(ports):
            held[f.name] = _bind(getattr(ports, f.name), Ports.LABELS[f.name], f"--{f.name}-port")
            setattr(ports, f.name, held[f.name].getsockname()[1])
    except StackError:
        for sock in held.values():
            sock.close()
        raise
    return held


def prepare_state_dir(state_dir: Path) -> None:
    """Start from empty: wipe a folder we made before, refuse to touch anything else."""
    if state_dir.exists():
        if any(state_dir.iterdir()) and not (state_dir / STATE_MARKER).exists():
            raise StackError(f"{state_dir} exists and was not made by devstack; choose another --state-dir.")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    (state_dir / STATE_MARKER).write_text("made by `python -m devstack up`; wiped on every start\n")
    (state_dir / ".gitignore").write_text("*\n")


@dataclass
class Stack:
    state_dir: Path
    ports: Ports
    tls: TlsFiles
    env: dict

    @property
    def azurite_log(self) -> Path:
        return self.state_dir / "azurite.log"

    def azurite_log_tail(self) -> str:
        return self.azurite_log.read_text(errors="replace")[-2000:]

    def remove_env(self) -> None:
        (self.state_dir / ENV_FILE).unlink(missing_ok=True)

    def write_env(self) -> Path:
        path = self.state_dir / ENV_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.env, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)
        return path


def _ssl_server_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    return context


async def _wait_until_ready(urls: dict[str, str], stack: Stack, azurite_proc: subprocess.Popen) -> None:
    client_ssl = ssl.create_default_context(cafile=str(stack.tls.ca_cert))
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    pending = dict(urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while pending:
            if azurite_proc.poll() is not None:
                raise StackError(
                    f"Azurite exited with code {azurite_proc.returncode}:\n{stack.azurite_log_tail()}"
                )
            for name, url in list(pending.items()):
                try:
                    async with session.get(url, ssl=client_ssl) as response:
                        await response.read()
                        pending.pop(name)  # any HTTP answer means it is serving
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                raise StackError(f"Timed out waiting for: {', '.join(pending)}")
            if pending:
                await asyncio.sleep(0.1)


def build_env(
    ports: Ports,
    tls: TlsFiles,
    *,
    access_key: str,
    resource_id: str,
    audience: str,
    msi_secret: str,
    system_mi: ManagedIdentity,
    user_mi: ManagedIdentity,
) -> dict:
    acs_endpoint = f"https://127.0.0.1:{ports.acs}/"
    az_ports = azurite.AzuritePorts(ports.blob, ports.queue, ports.table)
    return {
        "acs_endpoint": acs_endpoint,
        "acs_connection_string": f"endpoint={acs_endpoint};accesskey={access_key}",
        "acs_resource_id": resource_id,
        "acs_emulator_hooks": f"{acs_endpoint}_emulator/",
        "teams_app_id": TEAMS_APP_ID,
        "tables_endpoint": azurite.endpoint(ports.table),
        "tables_connection_string": azurite.connection_string(az_ports, services=("Table",)),
        "storage_connection_string": azurite.connection_string(az_ports),
        "blob_endpoint": azurite.endpoint(ports.blob),
        "queue_endpoint": azurite.endpoint(ports.queue),
        "issuer": f"http://127.0.0.1:{ports.issuer}",
        "audience": audience,
        "tenant_id": DEV_TENANT_ID,
        "identity_endpoint": f"http://127.0.0.1:{ports.msi}/msi/token",
        "identity_header": msi_secret,
        "managed_identity_client_id": system_mi.client_id,
        "user_assigned_client_id": user_mi.client_id,
        "ca_bundle": str(tls.ca_cert),
        "ports": asdict(ports),
        "pid": os.getpid(),
    }


@dataclass
class Prepared:
    """Everything decided before the first server starts: sockets, files, keys, apps."""

    stack: Stack
    sockets: dict[str, socket.socket]
    apps: dict[str, tuple[web.Application, ssl.SSLContext | None]]


def prepare(state_dir: Path, ports: Ports, *, audience: str, tls_dir: Path | None) -> Prepared:
    try:
        azurite.find_node()
    except azurite.AzuriteUnavailable as err:
        raise StackError(str(err)) from None

    sockets = reserve(ports)
    state_dir = state_dir.resolve()
    try:
        prepare_state_dir(state_dir)
    except StackError:
        for sock in sockets.values():
            sock.close()
        raise
    tls = load_or_create_tls_files(tls_dir.resolve()) if tls_dir else create_tls_files(state_dir)

    issuer_key, acs_key, msi_key = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    issuer_key.save(state_dir / ISSUER_KEY_FILE)
    access_key = base64.b64encode(secrets.token_bytes(64)).decode("ascii")
    resource_id = new_resource_id()
    msi_secret = secrets.token_urlsafe(24)
    system_mi, user_mi = ManagedIdentity.new(), ManagedIdentity.new()
    env = build_env(
        ports,
        tls,
        access_key=access_key,
        resource_id=resource_id,
        audience=audience,
        msi_secret=msi_secret,
        system_mi=system_mi,
        user_mi=user_mi,
    )
    resource = AcsResource(
        resource_id=resource_id,
        signing_key=acs_key,
        teams_app_id=TEAMS_APP_ID,
        teams_issuer=env["issuer"],
        teams_issuer_key=issuer_key,
    )
    emulator = AcsEmulator(resource, access_key=base64.b64decode(access_key), managed_identity_key=msi_key)
    msi = ManagedIdentityEndpoint(
        key=msi_key,
        secret=msi_secret,
        tenant_id=DEV_TENANT_ID,
        system_assigned=system_mi,
        user_assigned=(user_mi,),
    )
    apps = {
        "acs": (emulator.app(), _ssl_server_context(tls)),
        "issuer": (DevIssuer(issuer=env["issuer"], key=issuer_key).app(), None),
        "msi": (msi.app(), None),
    }
    return Prepared(Stack(state_dir, ports, tls, env), sockets, apps)


async def serve(prepared: Prepared, *, quiet: bool = False) -> int:
    stack, sockets = prepared.stack, prepared.sockets
    ports, env = stack.ports, stack.env
    runners: list[web.AppRunner] = []
    azurite_proc: subprocess.Popen | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name, (app, ssl_context) in prepared.apps.items():
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, sockets.pop(name), ssl_context=ssl_context).start()
        for sock in sockets.values():  # Azurite binds these itself
            sock.close()
        azurite_proc = azurite.start(
            azurite.AzuritePorts(ports.blob, ports.queue, ports.table),
            stack.tls,
            stack.state_dir / "azurite",
            stack.azurite_log,
        )
        await _wait_until_ready(
            {
                "ACS emulator": f"{env['acs_emulator_hooks']}stats",
                "issuer": f"{env['issuer']}/.well-known/openid-configuration",
                "managed identity": env["identity_endpoint"],
                "Azurite Table": f"https://127.0.0.1:{ports.table}/",
                "Azurite Blob": f"https://127.0.0.1:{ports.blob}/",
                "Azurite Queue": f"https://127.0.0.1:{ports.queue}/",
            },
            stack,
            azurite_proc,
        )
        env_path = stack.write_env()
        if not quiet:
            print(summary(stack, env_path), flush=True)
        await stop.wait()
        return 0
    finally:
        if azurite_proc is not None:
            azurite.stop(azurite_proc)
        for runner in runners:
            await runner.cleanup()
        for sock in sockets.values():
            sock.close()
        stack.remove_env()


def summary(stack: Stack, env_path: Path) -> str:
    env = stack.env
    return "\n".join(
        [
            "Local stack is up (fresh, empty state: nothing survives a restart).",
            f"  ACS Identity emulator   {env['acs_endpoint']}  (hooks: {env['acs_emulator_hooks']})",
            f"  Azurite Table           {env['tables_endpoint']}",
            f"  dev OpenID issuer       {env['issuer']}/.well-known/openid-configuration",
            f"  managed identity        {env['identity_endpoint']}",
            f"  CA certificate          {env['ca_bundle']}",
            f"  settings for clients    {env_path}  (holds keys: keep it local)",
            "",
            "Try it:",
            "  make -s token USER=alice                      # a user JWT from the dev issuer",
            f"  curl -s {env['acs_emulator_hooks']}stats --cacert {env['ca_bundle']}",
            "",
            "Ctrl-C stops everything.",
        ]
    )


def main(state_dir: Path, ports: Ports, *, audience: str, quiet: bool, tls_dir: Path | None) -> int:
    try:
        prepared = prepare(state_dir, ports, audience=audience, tls_dir=tls_dir)
        return asyncio.run(serve(prepared, quiet=quiet))
    except StackError as err:
        print(f"devstack: {err}", file=sys.stderr)
        return 2
