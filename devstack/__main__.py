"""Command line of the local stack: `python -m devstack up | token | timer | host`.

Only light modules are imported up here: `host` must put the app settings (SSL_CERT_FILE among
them) into its environment before anything imports aiohttp, which reads that variable once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import layout
from .layout import Ports


def _state_dir(value: str | None) -> Path:
    """--state-dir, else $DEVSTACK_STATE, else .devstack: every command finds the stack `up` started."""
    return Path(value or os.environ.get(layout.STATE_ENV) or layout.DEFAULT_STATE_DIR)


def cmd_up(args: argparse.Namespace) -> int:
    from . import stack

    ports = Ports.free() if args.free_ports else Ports()
    for f in fields(ports):
        value = getattr(args, f"{f.name}_port")
        if value is not None:
            setattr(ports, f.name, value)
    tls_dir = Path(args.tls_dir) if args.tls_dir else None
    return stack.main(
        _state_dir(args.state_dir),
        ports,
        audience=args.audience,
        quiet=args.quiet,
        tls_dir=tls_dir,
        host_app=None if args.no_host else args.host_app,
    )


def load_env(state_dir: Path) -> dict:
    path = state_dir / layout.ENV_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        hint = (
            ""
            if os.environ.get(layout.STATE_ENV)
            else (f" A stack started with --state-dir elsewhere: set {layout.STATE_ENV} to that folder.")
        )
        raise SystemExit(
            f"devstack: no running stack ({path} not found): start one with `make run`.{hint}"
        ) from None


def cmd_env(args: argparse.Namespace) -> int:
    """One value of the running stack's env.json (or all of it), for shell commands: no jq needed."""
    env = load_env(_state_dir(args.state_dir))
    if args.key is None:
        print(json.dumps(env, indent=2))
        return 0
    if args.key not in env:
        raise SystemExit(f"devstack: env.json has no {args.key!r}; it has: {', '.join(sorted(env))}")
    value = env[args.key]
    print(value if isinstance(value, str) else json.dumps(value))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .issuer import TENANT_TEMPLATE, mint_user_token
    from .signing import SigningKey

    state_dir = _state_dir(args.state_dir)
    env = load_env(state_dir)
    if not 1 <= args.minutes <= 24 * 60:
        raise SystemExit("devstack: --minutes must be from 1 to 1440")
    issuers = env.get("issuers") or {"dev": env["issuer"]}  # a stack started before there were more
    if args.issuer not in issuers:
        raise SystemExit(f"devstack: this stack has no issuer {args.issuer!r}; it has {', '.join(issuers)}")
    issuer, tenant = issuers[args.issuer], args.tenant or env["tenant_id"]
    if args.issuer == "entra":  # each tenant its own `iss`, and its `tid` the same tenant
        tenant = args.tenant or env["entra_tenants"][0]
        issuer = issuer.replace(TENANT_TEMPLATE, tenant)
    key = SigningKey.load(state_dir / layout.ISSUER_KEY_FILES[args.issuer])
    print(
        mint_user_token(
            key=key,
            issuer=issuer,
            audience=args.audience or env["audience"],
            user=args.user,
            roles=args.role,
            minutes=args.minutes,
            tenant_id=tenant,
            app_id=args.app_id,
        )
    )
    return 0


def apply_values(local_settings: dict) -> None:
    """local.settings.json "Values" as environment variables; ones already set win, as in Core Tools."""
    for name, value in (local_settings.get("Values") or {}).items():
        if value not in ("", None):
            os.environ.setdefault(name, str(value))


def cmd_host(args: argparse.Namespace) -> int:
    from .service_settings import REPO_ROOT, read_local_settings

    settings_path = Path(args.settings) if args.settings else None
    if settings_path and not settings_path.exists():
        raise SystemExit(f"devstack: {settings_path} not found")
    local_settings = {} if args.no_settings else read_local_settings(settings_path)
    apply_values(local_settings)

    from . import devhost  # imports aiohttp: only now that the settings are in os.environ

    app = Path(args.app) if Path(args.app).is_absolute() else REPO_ROOT / args.app
    if not app.exists():
        raise SystemExit(
            f"devstack: {app} not found (--app names the function app's script, e.g. function_app.py)"
        )
    return devhost.main(
        app_script=str(app),
        port=args.port,
        function_key=args.function_key or os.environ.get(layout.FUNCTION_KEY_ENV),
        local_settings=local_settings,
    )


def cmd_timer(args: argparse.Namespace) -> int:
    """Run a timer function's work once, now, against the running stack, ignoring backoff waits."""
    from .service_settings import settings_for_host

    env = load_env(_state_dir(args.state_dir))
    os.environ.update(settings_for_host(env))  # before anything imports aiohttp

    import asyncio

    async def run() -> dict:
        from shared.compose import reset_services, services

        try:
            cleanup = services().cleanup
            if args.dry_run:
                from shared.http.bodies import retention_preview

                return retention_preview(await cleanup.preview(args.limit))  # the admin route's JSON
            return await cleanup.run(ignore_backoff=True)
        finally:
            await reset_services()

    report = asyncio.run(run())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(describe_preview(report) if args.dry_run else describe_cleanup(report))
    return 0


CLEANUP_LINES = (
    ("pending_due", "pending revocations and deletions due"),
    ("revoked", "revocations completed"),
    ("deleted", "deletions completed"),
    ("discarded", "identities left over from lost creation races deleted"),
    ("retention_claimed", "stale identities claimed: deleted by a run 10 minutes on, unless used first"),
    ("retention_deleted", "identities unused for IDENTITY_RETENTION_DAYS retired"),
    ("retention_cancelled", "retention claims given up: used since, or deleted another way"),
    ("retention_unmapped_deleted", "identities a crash left unmapped deleted"),
    ("event_ids_forgotten", "event ids older than a week forgotten"),
)


def describe_cleanup(report: dict) -> str:
    """What a cleanup run did, a line a kind; the rest of its counters (retries, deferrals) after."""
    lines = [f"cleanup: {report.get(key, 0)} {text}" for key, text in CLEANUP_LINES]
    other = {k: v for k, v in report.items() if k not in dict(CLEANUP_LINES)}
    if other:
        lines.append("  also: " + ", ".join(f"{k}={v}" for k, v in sorted(other.items())))
    return "\n".join(lines)


PREVIEW_STATES = {
    "stale": "unused for the retention period: the next run claims it",
    "claimed": "claimed: deleted then at the earliest, unless used first",
    "deleting": "committed: being deleted",
    "unmapped": "no user maps to it: the next run deletes it",
}


def describe_preview(preview: dict) -> str:
    """What retention would delete next, a line an identity, oldest first."""
    lines = [
        f"retention dry run: identities unused since before {preview['cutoff']} "
        f"({preview['retentionDays']} days); a claim waits {preview['graceMinutes']} minutes for a use"
    ]
    for item in preview["identities"]:
        lines.append(
            f"  {item['communicationUserId']}  last used {item['lastUsedOn'] or '-'}  "
            f"not before {item['notBefore']}  {PREVIEW_STATES[item['state']]}"
        )
    if not preview["identities"]:
        lines.append("  nothing to delete")
    if preview["truncated"]:
        lines.append(f"  ... and more (--limit, at most {len(preview['identities'])} listed)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole local stack until Ctrl-C")
    up.add_argument(
        "--state-dir",
        help=f"where keys, certificates and env.json go (default ${layout.STATE_ENV}, else .devstack)",
    )
    up.add_argument("--tls-dir", help="reuse (or create) the CA and server certificate in this folder")
    up.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    for f in fields(Ports):
        up.add_argument(
            f"--{f.name}-port",
            type=int,
            metavar="PORT",
            help=f"{Ports.LABELS[f.name]} (default {f.default}; 0 = any free port)",
        )
    up.add_argument("--audience", default=layout.DEFAULT_AUDIENCE, help="aud of the dev issuer's tokens")
    up.add_argument(
        "--no-host", action="store_true", help="do not start the dev host (e.g. to run `func start` instead)"
    )
    up.add_argument(
        "--host-app",
        default=layout.DEFAULT_FUNCTION_APP,
        metavar="SCRIPT",
        help="the function app's script the dev host's worker indexes (default function_app.py)",
    )
    up.add_argument("--quiet", action="store_true", help="print nothing once ready")
    up.set_defaults(func=cmd_up)

    token = sub.add_parser("token", help="print a user JWT from the running stack's dev issuer")
    token.add_argument("user", help="the `sub` claim, verbatim")
    token.add_argument("--role", action="append", default=[], help="an app role (repeatable)")
    token.add_argument("--minutes", type=int, default=60, help="lifetime (default 60)")
    token.add_argument("--audience", help="override aud (e.g. the ACS Teams scope)")
    token.add_argument("--app-id", help="appid/azp claim, as on an Entra token for a client app")
    token.add_argument(
        "--issuer",
        choices=tuple(layout.ISSUER_KEY_FILES),
        default="dev",
        help="which dev issuer signs it: dev (AUTH_ISSUER's), entra (multi-tenant), second",
    )
    token.add_argument("--tenant", help="tid (and, for --issuer entra, the tenant in iss); a GUID")
    token.add_argument("--state-dir")
    token.set_defaults(func=cmd_token)

    timer = sub.add_parser("timer", help="run a timer function's work once now against the running stack")
    timer.add_argument("name", choices=["cleanup"], help="the timer function")
    timer.add_argument("--json", action="store_true", help="print the run's counters as JSON")
    timer.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing: list what retention would delete next, and when",
    )
    timer.add_argument("--limit", type=int, default=100, help="with --dry-run: list at most this many")
    timer.add_argument("--state-dir")
    timer.set_defaults(func=cmd_timer)

    env = sub.add_parser("env", help="print a value of the running stack's env.json (api, master_key, ...)")
    env.add_argument("key", nargs="?", help="e.g. api, function_key, master_key; none: the whole file")
    env.add_argument("--state-dir")
    env.set_defaults(func=cmd_env)

    host = sub.add_parser("host", help="serve a function app on 127.0.0.1 like the Functions host")
    host.add_argument("--port", type=int, default=7071, help="default 7071; 0 = any free port")
    host.add_argument(
        "--app",
        default=layout.DEFAULT_FUNCTION_APP,
        help="the app's script, relative to the repository or absolute (default function_app.py); "
        "its folder is the app folder (host.json, imports)",
    )
    host.add_argument(
        "--function-key",
        help=f"the function key (default ${layout.FUNCTION_KEY_ENV}, which, unlike this option, stays "
        f"out of `ps`); ${layout.HOST_KEY_ENV} and ${layout.MASTER_KEY_ENV} set the host and master keys",
    )
    settings = host.add_mutually_exclusive_group()
    settings.add_argument(
        "--settings",
        metavar="FILE",
        help="local.settings.json to apply: Values, Host.CORS (default local.settings.json, else the sample)",
    )
    settings.add_argument(
        "--no-settings", action="store_true", help="apply no settings file (`devstack up` passes everything)"
    )
    host.set_defaults(func=cmd_host)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
