"""GET /api/demo and the dev host's dev sign-in that the page uses on the local stack."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess

import jwt
import pytest
import requests

import function_app
from devstack.dev_signin import DevSignin
from shared.http import demo
from tests.conftest import REPO_ROOT
from tests.service_fixtures import configure
from tests.service_helpers import body_of, request

BUNDLE = REPO_ROOT / "shared" / "demo" / "app.bundle.js"


async def _get_demo():
    return await function_app.demo(request("GET", "demo"))


async def test_the_page_is_served_with_its_script_inline_and_a_strict_csp(service):
    response = await _get_demo()
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_body().decode()
    bundle = BUNDLE.read_text()
    assert bundle in html and "/*APP*/" not in html
    csp = response.headers["Content-Security-Policy"]
    digest = base64.b64encode(hashlib.sha256(bundle.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert len(re.findall(r"<script", html)) == 1  # nothing loaded from elsewhere
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_the_page_is_404_unless_enabled(service, monkeypatch):
    await configure(monkeypatch, service.stack, managed_identity=False, DEMO_PAGE_ENABLED="false")
    response = await _get_demo()
    assert response.status_code == 404 and body_of(response)["code"] == "demo_page_disabled"
    await configure(monkeypatch, service.stack, managed_identity=False, DEMO_PAGE_ENABLED="")
    assert (await _get_demo()).status_code == 404  # off by default (infra leaves it off)


async def test_a_bad_setting_is_named(service, monkeypatch):
    await configure(monkeypatch, service.stack, managed_identity=False, DEMO_PAGE_ENABLED="maybe")
    response = await _get_demo()
    assert response.status_code == 503 and "DEMO_PAGE_ENABLED" in body_of(response)["detail"]


def test_the_committed_bundle_is_the_source_built(tmp_path):
    """shared/demo/app.bundle.js is committed (Azure deploys no Node build); it must match app.js."""
    npm = shutil.which("npm")
    if not (REPO_ROOT / "node_modules" / ".bin" / "esbuild").exists() or npm is None:
        pytest.skip("esbuild is not installed: run `npm ci` (make test does)")
    out = tmp_path / "app.bundle.js"
    subprocess.run(
        [npm, "run", "--silent", "build:demo", "--", f"--outfile={out}"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert out.read_bytes() == BUNDLE.read_bytes(), "stale bundle: run `make demo-bundle`"


def test_the_bundle_cannot_end_the_inline_script():
    demo.page.cache_clear()
    body, _csp = demo.page()
    assert body.count(b"</script") == 1


# ---- the dev host's dev sign-in (local stack only) ---------------------------------------------------------


def _signin(stack, body=None, **kwargs) -> requests.Response:
    base = stack["api"].removesuffix("/api")
    kwargs.setdefault("json", body if body is not None else {"user": "signin-sam"})
    return requests.post(f"{base}/.devstack/token", timeout=30, **kwargs)


def test_dev_signin_mints_plain_user_tokens_the_service_accepts(stack, emulator):
    response = _signin(stack)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    token = response.json()["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "signin-sam" and claims["roles"] == [] and claims["aud"] == stack["audience"]
    assert claims["exp"] - claims["iat"] == 60 * 60
    issued = requests.post(f"{stack['api']}/token", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert issued.status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"headers": {"Origin": "https://evil.example"}}, 403),
        ({"headers": {"Origin": "http://localhost:3000"}}, 403),  # allowed by Host.CORS, still not ours
        ({"headers": {"Host": "rebound.evil.example"}}, 403),  # DNS rebinding
        (
            {
                "json": None,
                "data": "user=x",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            415,
        ),
        ({"json": {"user": "x", "roles": ["TokenService.Admin"]}}, 400),
        ({"json": {"user": "has space"}}, 400),
        ({"json": {"user": ""}}, 400),
        ({"json": ["x"]}, 400),
        ({"params": {"user": "x"}}, 400),
    ],
)
def test_dev_signin_refuses(stack, kwargs, status):
    assert _signin(stack, **kwargs).status_code == status


def test_dev_signin_is_post_only(stack):
    base = stack["api"].removesuffix("/api")
    assert requests.get(f"{base}/.devstack/token", timeout=30).status_code == 405


def test_dev_signin_is_off_unless_devstack_up_turns_it_on():
    assert DevSignin.from_environ({}) is None


def test_devstack_up_hands_the_host_a_key_path_not_the_key(tmp_path):
    from devstack import host_launcher
    from devstack.layout import DEV_SIGNIN_ENV, ISSUER_KEY_FILE
    from devstack.signing import SigningKey

    key_file = tmp_path / ISSUER_KEY_FILE
    SigningKey.generate().save(key_file)
    env = {"issuer": "http://127.0.0.1:1", "audience": "api://x", "tenant_id": "t"}
    config = DevSignin.config(key_file=key_file, env=env)
    assert "PRIVATE KEY" not in config and str(key_file) in config
    signin = DevSignin.from_environ({DEV_SIGNIN_ENV: config})
    assert signin is not None and signin.audience == "api://x"
    stack_env = {
        **env,
        "ca_bundle": "ca.pem",
        "storage_connection_string": "UseDevelopmentStorage=true",
        "teams_app_id": "1fd5118e-2576-4263-8130-9503064c837a",
        "acs_endpoint": "https://127.0.0.1:2/",
        "tables_endpoint": "https://127.0.0.1:3/devstoreaccount1",
        "identity_endpoint": "http://127.0.0.1:4/msi/token",
        "identity_header": "h",
    }
    environment = host_launcher.environment(
        stack_env,
        function_key="k",
        host_key="h",
        master_key="m",
        local_settings={},
        base={},
        dev_signin=config,
    )
    assert environment[DEV_SIGNIN_ENV] == config
    assert environment["DEMO_PAGE_ENABLED"] == "true"
    assert environment["TEAMS_CLIENT_APP_ID"] == stack_env["teams_app_id"]
    assert DEV_SIGNIN_ENV not in host_launcher.environment(
        stack_env, function_key="k", host_key="h", master_key="m", local_settings={}, base={}
    )


@pytest.mark.parametrize("issuer", ["entra", "second"])
def test_dev_signin_signs_in_with_the_other_dev_issuers(stack, issuer):
    """The demo's issuer choice (README, "Several identity providers")."""
    tenant = stack["entra_tenants"][1]
    body = {"user": "signin-multi", "issuer": issuer} | ({"tenant": tenant} if issuer == "entra" else {})
    response = _signin(stack, body)
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["token"], options={"verify_signature": False})
    expected = stack["issuers"][issuer].replace("{tenantid}", tenant)
    assert claims["iss"] == expected and claims["roles"] == []
    assert claims["tid"] == (tenant if issuer == "entra" else stack["tenant_id"])


@pytest.mark.parametrize(
    "body",
    [
        {"user": "x", "issuer": "evil"},
        {"user": "x", "issuer": "entra"},  # a tenant is needed
        {"user": "x", "issuer": "entra", "tenant": "contoso"},
        {"user": "x", "issuer": "second", "tenant": "aaaaaaaa-0000-4000-8000-00000000000a"},
        {"user": "x", "issuer": "dev", "tenant": "aaaaaaaa-0000-4000-8000-00000000000a"},
        {"user": "x", "issuer": ["entra"]},
    ],
)
def test_dev_signin_refuses_an_issuer_it_does_not_have(stack, body):
    response = _signin(stack, body)
    assert response.status_code == 400 and "issuer" in response.json()["error"]
