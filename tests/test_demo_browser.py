"""The demo page in headless Chromium (playwright-core + Debian's chromium), against the session stack.

tests/browser/demo.spec.mjs signs in as a dev user through the dev host, waits for the page to
show the ACS identity and the token's expiry, then moves the page's clock ahead so that
AzureCommunicationTokenCredential's proactive refresh fires and calls POST /api/token/refresh.
Without /usr/bin/chromium (`apt-get install chromium`) the test is skipped, and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
SCRIPT = REPO_ROOT / "tests" / "browser" / "demo.spec.mjs"
USER = "browser-demo-user"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"browser demo test skipped: {CHROMIUM} not found (apt-get install chromium; .ci/run does)",
)


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.slow
def test_demo_page_signs_in_shows_the_identity_and_refreshes_the_token(stack, emulator):
    node = shutil.which("node")
    if node is None or not (REPO_ROOT / "node_modules" / "playwright-core").exists():
        pytest.fail("node or playwright-core missing: run `npm ci` (make test does)")
    calls_before = emulator.stats()["calls"]
    started = dt.datetime.now(dt.UTC)
    run = subprocess.run(
        [node, str(SCRIPT), f"{stack['api']}/demo", USER],
        cwd=REPO_ROOT,
        env={**os.environ, "CHROMIUM_PATH": str(CHROMIUM)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    shown = json.loads(run.stdout.strip().splitlines()[-1])
    assert shown["problems"] == []  # no script error, no CSP violation, no failed request

    # The identity on the page is the one the service mapped to this user.
    bearer = stack.token(USER).strip()
    identity = requests.get(
        f"{stack['api']}/identity", headers={"Authorization": f"Bearer {bearer}"}, timeout=30
    )
    assert shown["identity"] == identity.json()["communicationUserId"]

    # The credential refreshed once through POST /api/token/refresh. Only the page's clock moved:
    # to the service the token is seconds old, so the refresh is answered with it again (README,
    # "Token storms"), its real expiry shown, and no ACS call made.
    assert shown["before"]["refreshes"] == "0" and shown["after"]["refreshes"] == "1"
    assert shown["status"] == "Token refreshed." and shown["after"]["refreshed"] != "-"
    before, after = _time(shown["before"]["expires"]), _time(shown["after"]["expires"])
    assert after == before
    assert started + dt.timedelta(minutes=59) <= after <= dt.datetime.now(dt.UTC) + dt.timedelta(minutes=61)
    calls = emulator.stats()["calls"]
    assert calls["createIdentity"] - calls_before["createIdentity"] == 1  # POST /api/token
    assert calls["issueAccessToken"] - calls_before["issueAccessToken"] == 0  # the refresh: answered again
