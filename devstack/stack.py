"""`python -m devstack up`: start every local stand-in, write `env.json`, stop them all on exit.

One asyncio process serves the ACS emulator, the dev issuer and the managed-identity endpoint;
Azurite and the dev host (the function app) run as children in their own process groups that die
with us. Ports are reserved by binding them before anything starts, so a taken port fails fast and
auto-picked ports cannot be stolen.
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
from typing import Any

import aiohttp
from aiohttp import web

from . import azurite, host_launcher
from .acs_emulator import AcsEmulator
from .acs_state import AcsResource, new_resource_id
from .ca import TlsFiles, create_tls_files, load_or_create_tls_files
from .children import stop as stop_child
from .cors import CorsPolicy
from .dev_signin import DevSignin
from .graph import GraphStandIn
from .issuer import DEV_TENANT_ID, ENTRA_TENANTS, DevIssuer, auth_issuers_example, issuers_of
from .layout import (  # noqa: F401  (re-exported: stack.Ports and friends are the stack's API)
    DEFAULT_AUDIENCE,
    DEFAULT_FUNCTION_APP,
    DEFAULT_STATE_DIR,
    ENV_FILE,
    HOST_LOG_FILE,
    ISSUER_KEY_FILE,
    ISSUER_KEY_FILES,
    STATE_ENV,
    STATE_MARKER,
    Ports,
)
from .msi import ManagedIdentity, ManagedIdentityEndpoint
from .service_settings import read_local_settings
from .signing import SigningKey

TEAMS_APP_ID = "1fd5118e-2576-4263-8130-9503064c837a"
READY_TIMEOUT_SECONDS = 60.0


class StackError(RuntimeError):
    """Something stops the stack from starting; the message tells the user what to do."""


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


def reserve(ports: Ports, skip: tuple[str, ...] = ()) -> dict[str, socket.socket]:
    """Bind every port now; our own servers keep their sockets, children's are released at launch."""
    held: dict[str, socket.socket] = {}
    try:
        for f in fields(ports):
            if f.name in skip:
                continue
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
    host: HostPlan | None = None
    host_problem: str | None = None  # set when the host answers, but without the function app
    host_status: dict | None = None  # the host's /admin/host/status once it is up

    @property
    def azurite_log(self) -> Path:
        return self.state_dir / "azurite.log"

    @property
    def host_log(self) -> Path:
        return self.state_dir / HOST_LOG_FILE

    def log_tail(self, path: Path) -> str:
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def azurite_log_tail(self) -> str:
        return self.log_tail(self.azurite_log)

    def remove_env(self) -> None:
        (self.state_dir / ENV_FILE).unlink(missing_ok=True)

    def write_env(self) -> Path:
        path = self.state_dir / ENV_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.env, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)
        return path


@dataclass(frozen=True)
class HostPlan:
    """How the dev host will run: decided up front, so a bad Host.CORS fails before anything starts."""

    function_key: str
    host_key: str
    master_key: str
    local_settings: dict
    app_spec: str = DEFAULT_FUNCTION_APP


def _ssl_server_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    return context


async def _wait_until_ready(
    urls: dict[str, str], stack: Stack, children: dict[str, tuple[subprocess.Popen, Path]]
) -> None:
    """Until every URL gives any HTTP answer; a child that exits meanwhile stops the stack."""
    client_ssl = ssl.create_default_context(cafile=str(stack.tls.ca_cert))
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    pending = dict(urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while pending:
            for name, (process, log) in children.items():
                if process.poll() is not None:
                    raise StackError(f"{name} exited with code {process.returncode}:\n{stack.log_tail(log)}")
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


async def _host_problem(api: str) -> str | None:
    """What the host says when the function app did not load (it then answers 503 everywhere)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"{api}/") as response:
            if response.status != 503 or response.content_type != "application/problem+json":
                return None
            problem = await response.json(content_type=None)
    return problem.get("detail") if problem.get("code") == "host_import_failed" else None


async def _host_status(api: str, master_key: str) -> dict | None:
    """The host's own status (worker version, functions in error), through its admin API."""
    url = api.rsplit("/", 1)[0] + "/admin/host/status"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url, headers={"x-functions-key": master_key}) as response:
            return await response.json() if response.status == 200 else None


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
    host: HostPlan | None = None,
) -> dict:
    acs_endpoint = f"https://127.0.0.1:{ports.acs}/"
    az_ports = azurite.AzuritePorts(ports.blob, ports.queue, ports.table)
    env: dict[str, Any] = {
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
        # Every dev issuer's `iss` (the Entra-style one as its template) and that one's tenants.
        "issuers": issuers_of(f"http://127.0.0.1:{ports.issuer}"),
        "entra_tenants": list(ENTRA_TENANTS),
        # A value for AUTH_ISSUERS trusting all three (the Entra-style one for two of its tenants).
        "auth_issuers_example": auth_issuers_example(f"http://127.0.0.1:{ports.issuer}", audience),
        "identity_endpoint": f"http://127.0.0.1:{ports.msi}/msi/token",
        "graph_endpoint": f"https://127.0.0.1:{ports.graph}",
        "graph_hooks": f"https://127.0.0.1:{ports.graph}/_graph/",
        "identity_header": msi_secret,
        "managed_identity_client_id": system_mi.client_id,
        "user_assigned_client_id": user_mi.client_id,
        "ca_bundle": str(tls.ca_cert),
        "ports": asdict(ports),
        "pid": os.getpid(),
    }
    if host is None:  # --no-host: the port is not ours (`func start` may want it)
        env["ports"].pop("host")
    else:
        env["api"] = f"http://127.0.0.1:{ports.host}/api"
        env["function_key"] = host.function_key
        env["host_key"] = host.host_key
        env["master_key"] = host.master_key
    return env


@dataclass
class Prepared:
    """Everything decided before the first server starts: sockets, files, keys, apps."""

    stack: Stack
    sockets: dict[str, socket.socket]
    apps: dict[str, tuple[web.Application, ssl.SSLContext | None]]


def _plan_host(app_spec: str) -> HostPlan:
    local_settings = read_local_settings()
    host_section = local_settings.get("Host") or {}
    try:
        CorsPolicy.parse(host_section.get("CORS"), host_section.get("CORSCredentials", False))
    except ValueError as err:
        raise StackError(f"local.settings.json: {err}") from None
    return HostPlan(
        secrets.token_urlsafe(32),
        secrets.token_urlsafe(32),
        secrets.token_urlsafe(40),
        local_settings,
        app_spec,
    )


def prepare(
    state_dir: Path,
    ports: Ports,
    *,
    audience: str,
    tls_dir: Path | None,
    host_app: str | None = DEFAULT_FUNCTION_APP,
) -> Prepared:
    """`host_app` None: no dev host."""
    try:
        azurite.find_node()
    except azurite.AzuriteUnavailable as err:
        raise StackError(str(err)) from None
    host = _plan_host(host_app) if host_app else None

    sockets = reserve(ports, skip=() if host else ("host",))
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
    entra_key, second_key = SigningKey.generate(), SigningKey.generate()
    entra_key.save(state_dir / ISSUER_KEY_FILES["entra"])
    second_key.save(state_dir / ISSUER_KEY_FILES["second"])
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
        host=host,
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
        "issuer": (
            DevIssuer(issuer=env["issuer"], key=issuer_key, entra_key=entra_key, second_key=second_key).app(),
            None,
        ),
        "msi": (msi.app(), None),
        "graph": (GraphStandIn(managed_identity_key=msi_key).app(), _ssl_server_context(tls)),
    }
    return Prepared(Stack(state_dir, ports, tls, env, host), sockets, apps)


async def serve(prepared: Prepared, *, quiet: bool = False) -> int:
    stack, sockets = prepared.stack, prepared.sockets
    ports, env = stack.ports, stack.env
    runners: list[web.AppRunner] = []
    children: dict[str, tuple[subprocess.Popen, Path]] = {}
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
        for name in ("blob", "queue", "table"):  # Azurite binds these itself
            sockets.pop(name).close()
        children["Azurite"] = (
            azurite.start(
                azurite.AzuritePorts(ports.blob, ports.queue, ports.table),
                stack.tls,
                stack.state_dir / "azurite",
                stack.azurite_log,
            ),
            stack.azurite_log,
        )
        await _wait_until_ready(
            {
                "ACS emulator": f"{env['acs_emulator_hooks']}stats",
                "issuer": f"{env['issuer']}/.well-known/openid-configuration",
                "managed identity": env["identity_endpoint"],
                "Graph stand-in": f"{env['graph_hooks']}stats",
                "Azurite Table": f"https://127.0.0.1:{ports.table}/",
                "Azurite Blob": f"https://127.0.0.1:{ports.blob}/",
                "Azurite Queue": f"https://127.0.0.1:{ports.queue}/",
            },
            stack,
            children,
        )
        if stack.host is not None:
            await _start_host(stack, sockets.pop("host"), children)
        env_path = stack.write_env()
        if not quiet:
            print(summary(stack, env_path), flush=True)
        await stop.wait()
        return 0
    finally:
        for process, _log in reversed(children.values()):  # the host first: it talks to the rest
            stop_child(process)
        for runner in runners:
            await runner.cleanup()
        for sock in sockets.values():
            sock.close()
        stack.remove_env()


async def _start_host(
    stack: Stack, sock: socket.socket, children: dict[str, tuple[subprocess.Popen, Path]]
) -> None:
    """Start the host once the rest answers; it counts as up on any HTTP answer, even a 404 or 503."""
    assert stack.host is not None
    environment = host_launcher.environment(
        stack.env,
        function_key=stack.host.function_key,
        host_key=stack.host.host_key,
        master_key=stack.host.master_key,
        local_settings=stack.host.local_settings,
        dev_signin=DevSignin.config(key_file=stack.state_dir / ISSUER_KEY_FILE, env=stack.env),
    )
    sock.close()  # the host binds it itself, like Azurite
    process = host_launcher.start(stack.ports.host, stack.host.app_spec, environment, stack.host_log)
    children["dev host"] = (process, stack.host_log)
    await _wait_until_ready({"dev host": f"{stack.env['api']}/"}, stack, children)
    stack.host_problem = await _host_problem(stack.env["api"])
    stack.host_status = await _host_status(stack.env["api"], stack.host.master_key)


def summary(stack: Stack, env_path: Path) -> str:
    env = stack.env
    lines = [
        "Local stack is up (fresh, empty state: nothing survives a restart).",
        f"  ACS Identity emulator   {env['acs_endpoint']}  (hooks: {env['acs_emulator_hooks']})",
        f"  Azurite Table           {env['tables_endpoint']}",
        f"  dev OpenID issuer       {env['issuer']}/.well-known/openid-configuration",
        f"  managed identity        {env['identity_endpoint']}",
        f"  Graph stand-in          {env['graph_endpoint']}/v1.0/subscriptions (hooks: {env['graph_hooks']})",
    ]
    if "api" in env:
        lines.append(f"  dev host (functions)    {env['api']}  (log: {stack.host_log})")
        worker = (stack.host_status or {}).get("worker") or {}
        if worker.get("version"):
            lines.append(
                f"    Python worker: {worker['package']} {worker['version']} on Python {worker['python']}, "
                "the runtime Azure runs for this app"
            )
        if stack.host_problem:
            lines.append(f"    !! every /api route answers 503: {stack.host_problem}")
        for name, errors in ((stack.host_status or {}).get("functionErrors") or {}).items():
            lines.append(f"    !! FUNCTION IN ERROR, NOT LOADED (as in Azure): {name}: {' '.join(errors)}")
        lines.append("    function-level routes need the `function_key` from the settings file below")
        lines.append(f"  demo page               {env['api']}/demo  (signs in dev users; DEMO_PAGE_ENABLED)")
    lines += [
        f"  CA certificate          {env['ca_bundle']}",
        f"  settings for clients    {env_path}  (holds keys: keep it local)",
        "",
        "Try it:",
    ]
    if stack.state_dir != DEFAULT_STATE_DIR.resolve():  # make and devstack look in .devstack otherwise
        lines.append(
            f"  export {STATE_ENV}={stack.state_dir}   # so that make token/env/timer find this stack"
        )
    lines += [
        "  make -s token USER=alice                      # a user JWT from the dev issuer",
    ]
    if "api" in env:
        lines.append(
            f'  curl -s -X POST {env["api"]}/token -H "Authorization: Bearer $(make -s token USER=alice)"'
        )
    lines += [
        "  make -s timer                                 # run the cleanup timer's work once, now",
        f"  curl -s {env['acs_emulator_hooks']}stats --cacert {env['ca_bundle']}",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main(
    state_dir: Path,
    ports: Ports,
    *,
    audience: str,
    quiet: bool,
    tls_dir: Path | None,
    host_app: str | None = DEFAULT_FUNCTION_APP,
) -> int:
    try:
        prepared = prepare(state_dir, ports, audience=audience, tls_dir=tls_dir, host_app=host_app)
        return asyncio.run(serve(prepared, quiet=quiet))
    except StackError as err:
        print(f"devstack: {err}", file=sys.stderr)
        return 2
