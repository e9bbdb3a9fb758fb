"""`python -m devstack up | token`: readiness, env.json, clean shutdown, fail-fast, user tokens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jwt
import pytest
import requests

from devstack.layout import ENV_FILE
from tests.conftest import REPO_ROOT, start_stack, stop_stack, wait_for_env


def _token(stack, *args: str) -> str:
    return stack.token(*args)


def _verify_with_discovery(stack, token: str) -> dict:
    discovery = requests.get(stack["issuer"] + "/.well-known/openid-configuration", timeout=10).json()
    assert discovery["issuer"] == stack["issuer"]
    signing_key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
    return jwt.decode(
        token, signing_key.key, algorithms=["RS256"], audience=stack["audience"], issuer=discovery["issuer"]
    )


def test_env_json_has_the_contract_keys(stack):
    for key in (
        "acs_endpoint",
        "acs_connection_string",
        "tables_connection_string",
        "issuer",
        "audience",
        "ca_bundle",
    ):
        assert stack[key], key
    assert stack["acs_connection_string"].startswith(f"endpoint={stack['acs_endpoint']};accesskey=")


def test_token_prints_only_a_verifiable_user_jwt(stack):
    out = _token(stack, "alice@example.com", "--role", "TokenService.Admin", "--role", "Reader")
    assert out.count("\n") == 1
    token = out.strip()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"]
    claims = _verify_with_discovery(stack, token)
    assert claims["sub"] == "alice@example.com"
    assert claims["roles"] == ["TokenService.Admin", "Reader"]
    assert claims["tid"] == stack["tenant_id"]
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] <= time.time()


def test_token_oid_is_stable_per_user_and_distinct_across_users(stack):
    a1 = jwt.decode(_token(stack, "alice").strip(), options={"verify_signature": False})
    a2 = jwt.decode(_token(stack, "alice", "--minutes", "5").strip(), options={"verify_signature": False})
    b = jwt.decode(_token(stack, "bob").strip(), options={"verify_signature": False})
    assert a1["oid"] == a2["oid"] != b["oid"]
    assert a1["roles"] == [] and a2["exp"] - a2["iat"] == 300


def test_token_keeps_odd_subjects_verbatim(stack):
    sub = "tenant/ü ser#1?x=%2F"
    claims = _verify_with_discovery(stack, _token(stack, sub).strip())
    assert claims["sub"] == sub


def test_token_without_a_running_stack_says_so(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "devstack", "token", "alice", "--state-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "no running stack" in out.stderr and "make run" in out.stderr


@pytest.mark.slow
def test_up_prints_no_secret_and_stops_every_child(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up", "--free-ports", "--state-dir", str(tmp_path / "s")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    env = wait_for_env(process, tmp_path / "s")
    azurite_port = env["ports"]["table"]
    with socket.create_connection(("127.0.0.1", azurite_port), timeout=5):
        pass
    process.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    printed = (out + err).decode()
    assert "Local stack is up" in printed
    access_key = env["acs_connection_string"].split("accesskey=")[1]
    assert access_key not in printed and env["identity_header"] not in printed
    for port in env["ports"].values():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not (tmp_path / "s" / ENV_FILE).exists()


@pytest.mark.slow
def test_azurite_dies_with_a_killed_stack(tmp_path):
    process = start_stack(tmp_path / "s")
    env = wait_for_env(process, tmp_path / "s")
    process.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", env["ports"]["table"]), timeout=1).close()
        except OSError:
            return
        time.sleep(0.2)
    pytest.fail("Azurite outlived its parent")


def test_taken_port_fails_fast_with_a_clear_message(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        process = start_stack(tmp_path / "s", "--issuer-port", str(port))
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert time.monotonic() - started < 10
    message = err.decode()
    assert f"Port {port}" in message and "dev OpenID issuer" in message and "--issuer-port" in message
    assert not (tmp_path / "s").exists()  # nothing was started or written


def test_missing_node_fails_fast(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # python, but no node
    process = start_stack(tmp_path / "s", env=env)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "Node.js is not on PATH" in err.decode()


def test_refuses_to_wipe_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    process = start_stack(precious)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "not made by devstack" in err.decode()
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_two_stacks_coexist(stack, tmp_path):
    process = start_stack(tmp_path / "s2")
    try:
        other = wait_for_env(process, tmp_path / "s2")
        assert set(other["ports"].values()).isdisjoint(stack["ports"].values())
        assert requests.get(other["acs_emulator_hooks"] + "stats", timeout=10).json()["liveIdentities"] == 0
    finally:
        stop_stack(process)


def test_env_json_is_private(stack):
    assert (stack.state_dir / ENV_FILE).stat().st_mode & 0o077 == 0
    assert json.loads((stack.state_dir / ENV_FILE).read_text())["pid"] == stack.process.pid


def _make_venv(tmp_path, *args: str, path: str) -> subprocess.CompletedProcess:
    """The repository's Makefile, in an empty folder, making .venv with only `path` to find Python on."""
    import shutil

    (tmp_path / "Makefile").write_text((REPO_ROOT / "Makefile").read_text())
    make = shutil.which("make") or "/usr/bin/make"
    return subprocess.run(
        [make, "-s", ".venv/bin/python", *args],
        cwd=tmp_path,
        env={"PATH": path, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_says_what_to_install_when_python_3_13_is_missing(tmp_path):
    import shutil

    bare = "/usr/bin:/bin"
    if shutil.which("python3.13", path=bare) or shutil.which("pyenv", path=bare):
        pytest.skip("this machine has Python 3.13 where make looks first")
    result = _make_venv(tmp_path, path=bare)
    assert result.returncode != 0
    assert "Python 3.13 is needed and none was found" in result.stdout + result.stderr
    assert "pyenv install 3.13" in result.stdout + result.stderr
    assert not (tmp_path / ".venv").exists()


def test_make_refuses_a_python_that_is_not_3_13(tmp_path):
    other = "/usr/bin/python3"
    if not os.path.exists(other):
        pytest.skip("no /usr/bin/python3 to try")
    version = subprocess.run(
        [other, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    if version.stdout.strip() == "(3, 13)":
        pytest.skip("/usr/bin/python3 is 3.13 here")
    result = _make_venv(tmp_path, f"PYTHON={other}", path=os.environ["PATH"])
    assert result.returncode != 0
    assert "Azure runs this app on 3.13: set PYTHON=/path/to/python3.13" in result.stdout + result.stderr
    assert not (tmp_path / ".venv").exists()


def _devstack(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "DEVSTACK_STATE"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_command_finds_a_stack_started_elsewhere_through_devstack_state(stack, tmp_path):
    """Issue #14: `make token` and the timer said "no running stack" for `up --state-dir` stacks."""
    lost = _devstack("env", "api", cwd=tmp_path)
    assert lost.returncode != 0 and "set DEVSTACK_STATE to that folder" in lost.stderr
    found = {"DEVSTACK_STATE": str(stack.state_dir)}
    assert _devstack("env", "api", cwd=tmp_path, env=found).stdout.strip() == stack["api"]
    assert json.loads(_devstack("env", "ports", cwd=tmp_path, env=found).stdout) == stack["ports"]
    token = _devstack("token", "alice", cwd=tmp_path, env=found).stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "alice"
    unknown = _devstack("env", "no_such_key", cwd=tmp_path, env=found)
    assert unknown.returncode != 0 and "it has: " in unknown.stderr and "api" in unknown.stderr
    import shutil

    make = shutil.which("make") or "/usr/bin/make"
    for target, expected in ((["env", "KEY=api"], stack["api"]), (["token", "USER=alice"], None)):
        result = subprocess.run(
            [make, "-s", *target],
            cwd=REPO_ROOT,
            env={**os.environ, **found},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        if expected:
            assert result.stdout.strip() == expected


def test_node_requirement_is_the_oldest_every_pinned_package_accepts():
    """README and the Makefile's check say the Node.js major that package-lock.json's engines need."""
    import re

    lock = json.loads((REPO_ROOT / "package-lock.json").read_text())
    needed = 0
    for name, package in lock["packages"].items():
        engines = package.get("engines")
        if not name or package.get("optional") or not isinstance(engines, dict):
            continue  # the project itself; a platform binary npm may skip; no engines declared
        lower = re.match(r"^\s*(?:>=|\^|~)?\s*v?(\d+)", engines.get("node", ""))
        if lower:
            needed = max(needed, int(lower.group(1)))
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(rf"^NODE_MAJOR := {needed}$", makefile, re.MULTILINE), needed
    assert f"**Node.js {needed}+**" in (REPO_ROOT / "README.md").read_text()


def test_make_clean_removes_what_the_tools_leave(tmp_path):
    import shutil

    make = shutil.which("make") or "/usr/bin/make"
    dry = subprocess.run(
        [make, "-n", "clean"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    for leftover in (".venv", "node_modules", ".devstack", ".pytest_cache", ".ruff_cache", ".hypothesis"):
        assert leftover in dry.split(), leftover


@pytest.mark.parametrize("issuer", ["entra", "second"])
def test_token_mints_for_each_dev_issuer_verifiable_by_its_own_discovery(stack, issuer):
    """`--issuer entra --tenant T`: iss names T and tid is T; its keys come from the `common`
    document, whose issuer is the template (as Entra's); `--issuer second`: a key of its own."""
    tenant = stack["entra_tenants"][1]
    token = _token(stack, "alice", "--issuer", issuer, "--tenant", tenant).strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    template = stack["issuers"][issuer]
    if issuer == "entra":
        assert claims["iss"] == template.replace("{tenantid}", tenant) and claims["tid"] == tenant
        metadata = template.replace("{tenantid}", "common")
    else:
        assert claims["iss"] == template
        metadata = template
    discovery = requests.get(metadata + "/.well-known/openid-configuration", timeout=10).json()
    assert discovery["issuer"] == template
    signing_key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
    jwt.decode(token, signing_key.key, algorithms=["RS256"], audience=stack["audience"], issuer=claims["iss"])
    dev_keys = requests.get(stack["issuer"] + "/discovery/keys", timeout=10).json()["keys"]
    assert signing_key.key_id not in {k["kid"] for k in dev_keys}  # not the dev issuer's key
