"""Command line of the local stack: `python -m devstack up | token`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from . import stack
from .issuer import mint_user_token
from .keys import SigningKey


def _state_dir(value: str | None) -> Path:
    return Path(value) if value else stack.DEFAULT_STATE_DIR


def cmd_up(args: argparse.Namespace) -> int:
    ports = stack.Ports.free() if args.free_ports else stack.Ports()
    for f in fields(ports):
        value = getattr(args, f"{f.name}_port")
        if value is not None:
            setattr(ports, f.name, value)
    tls_dir = Path(args.tls_dir) if args.tls_dir else None
    return stack.main(
        _state_dir(args.state_dir), ports, audience=args.audience, quiet=args.quiet, tls_dir=tls_dir
    )


def load_env(state_dir: Path) -> dict:
    path = state_dir / stack.ENV_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"devstack: no running stack ({path} not found): start one with `make run`."
        ) from None


def cmd_token(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args.state_dir)
    env = load_env(state_dir)
    if not 1 <= args.minutes <= 24 * 60:
        raise SystemExit("devstack: --minutes must be from 1 to 1440")
    key = SigningKey.load(state_dir / stack.ISSUER_KEY_FILE)
    print(
        mint_user_token(
            key=key,
            issuer=env["issuer"],
            audience=args.audience or env["audience"],
            user=args.user,
            roles=args.role,
            minutes=args.minutes,
            tenant_id=env["tenant_id"],
            app_id=args.app_id,
        )
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole local stack until Ctrl-C")
    up.add_argument("--state-dir", help="where keys, certificates and env.json go (default .devstack)")
    up.add_argument("--tls-dir", help="reuse (or create) the CA and server certificate in this folder")
    up.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    for f in fields(stack.Ports):
        up.add_argument(
            f"--{f.name}-port",
            type=int,
            metavar="PORT",
            help=f"{stack.Ports.LABELS[f.name]} (default {f.default}; 0 = any free port)",
        )
    up.add_argument("--audience", default=stack.DEFAULT_AUDIENCE, help="aud of the dev issuer's tokens")
    up.add_argument("--quiet", action="store_true", help="print nothing once ready")
    up.set_defaults(func=cmd_up)

    token = sub.add_parser("token", help="print a user JWT from the running stack's dev issuer")
    token.add_argument("user", help="the `sub` claim, verbatim")
    token.add_argument("--role", action="append", default=[], help="an app role (repeatable)")
    token.add_argument("--minutes", type=int, default=60, help="lifetime (default 60)")
    token.add_argument("--audience", help="override aud (e.g. the ACS Teams scope)")
    token.add_argument("--app-id", help="appid/azp claim, as on an Entra token for a client app")
    token.add_argument("--state-dir")
    token.set_defaults(func=cmd_token)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
