// The demo page's script. Source of app.bundle.js: `make demo-bundle` rebuilds it with esbuild
// (a test checks that the committed bundle is this source, built).
//
// Sign in (a dev user from the local stack's dev host, or a pasted bearer token), get an ACS
// token from POST /api/token, then let @azure/communication-common's
// AzureCommunicationTokenCredential keep it fresh: with refreshProactively it schedules a refresh
// 10 minutes before the token's `exp`, and its tokenRefresher calls POST /api/token/refresh.
// The bearer token stays in this page's memory only: nothing is stored.
import { AzureCommunicationTokenCredential } from "@azure/communication-common";

const api = new URL(".", window.location.href); // the page is <api>/demo
const $ = (id) => document.getElementById(id);
let bearer = null;
let credential = null;
let refreshes = 0;

function status(text, isError = false) {
  const line = $("status");
  line.textContent = text;
  line.className = isError ? "error" : "";
}

function iso(timestamp) {
  return new Date(timestamp).toISOString().replace(/\.\d{3}Z$/, "Z");
}

async function post(path, signal) {
  const response = await fetch(new URL(path, api), {
    method: "POST",
    headers: { Authorization: `Bearer ${bearer}` },
    signal,
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${path}: ${response.status} ${body.code || ""} ${body.detail || ""}`.trim());
  }
  return body;
}

async function showExpiry() {
  const token = await credential.getToken();
  $("expires").textContent = iso(token.expiresOnTimestamp);
}

async function start() {
  credential?.dispose();
  refreshes = 0;
  $("refreshes").textContent = "0";
  status("Getting an ACS token...");
  const first = await post("token");
  $("identity").textContent = first.communicationUserId;
  credential = new AzureCommunicationTokenCredential({
    token: first.token,
    refreshProactively: true,
    tokenRefresher: async (abortSignal) => {
      status("Refreshing the ACS token...");
      const body = await post("token/refresh", abortSignal);
      refreshes += 1;
      $("refreshes").textContent = String(refreshes);
      $("refreshed").textContent = iso(Date.now());
      // The credential takes the new token once this returns; show its expiry right after.
      setTimeout(() => showExpiry().then(() => status("Token refreshed.")), 0);
      return body.token;
    },
  });
  await showExpiry();
  $("session").hidden = false;
  status(first.identityCreated ? "Signed in; a new ACS identity was created." : "Signed in.");
}

async function run(step) {
  try {
    await step();
  } catch (err) {
    status(String(err.message || err), true);
  }
}

// The local stack's dev issuers (README, "Several identity providers"): the service accepts the
// Entra-style and second ones only when AUTH_ISSUERS trusts them (`make env KEY=auth_issuers_example`).
function signInAs(user, choice) {
  const [issuer, tenant] = choice.split(":");
  if (issuer === "dev") return { user };
  return tenant ? { user, issuer, tenant } : { user, issuer };
}

$("dev-signin").addEventListener("submit", (event) => {
  event.preventDefault();
  run(async () => {
    const response = await fetch("/.devstack/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(signInAs($("user").value.trim(), $("issuer").value)),
    });
    if (response.status === 404) {
      throw new Error("This host has no dev sign-in (it exists on the local stack only): paste a token.");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(`dev sign-in: ${response.status} ${body.error || ""}`.trim());
    bearer = body.token;
    await start();
  });
});

$("paste-signin").addEventListener("submit", (event) => {
  event.preventDefault();
  run(async () => {
    bearer = $("bearer").value.trim();
    $("bearer").value = "";
    if (!bearer) throw new Error("Paste a bearer token first.");
    await start();
  });
});
