"""Static checks of the `azd up` deployment: azure.yaml, infra/ (Bicep) and the postdeploy hook.

No Bicep compiler can be installed from the registries this project may use (PyPI, npm, Debian;
`az bicep install` and the npm `bicep-node` wrapper download the binary from GitHub), so these tests
read the files: the settings contract against shared/settings.py's table, keyless configuration, the role
assignments, the Flex Consumption shape, and the wiring between Bicep modules (every module
parameter declared, every required one given, every output used exists). Where a Bicep compiler or
the pycep-parser package is present they also build/parse every file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared import settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
HOOK_SH = INFRA / "hooks" / "postdeploy.sh"
HOOK_PS1 = INFRA / "hooks" / "postdeploy.ps1"

# Settings that hold keys: never part of the deployment (the service uses endpoints + identity).
KEY_SETTINGS = {settings.ACS_CONNECTION_STRING.name, settings.TABLES_CONNECTION_STRING.name}
# Set by the platform, never by infra: App Service injects WEBSITE_AUTH_ENABLED=True while
# Authentication is on, and the service trusts Easy Auth's principal header only then.
PLATFORM_SETTINGS = {settings.PLATFORM_AUTH_SETTING}
# The system-assigned identity needs no client id; setting one would select a user-assigned identity.
UNSET_IN_AZURE = {settings.AZURE_CLIENT_ID.name}

# Azure built-in role ids (MicrosoftDocs/azure-docs articles/role-based-access-control/built-in-roles),
# by the key infra/app/rbac.bicep files them under.
ROLES = {
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
    "storageQueueDataContributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",  # Monitoring Metrics Publisher
}
ACS_ROLES = {
    "Contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "Communication and Email Service Owner": "09976791-48a7-449e-bb21-39d1a415f350",
}


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def infra_text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def strip_comments(src: str) -> str:
    """Bicep source with comments blanked and string contents kept (so offsets stay meaningful)."""
    out, i, n = [], 0, len(src)
    while i < n:
        if src.startswith("'''", i):
            j = src.find("'''", i + 3)
            j = n if j < 0 else j + 3
            out.append(src[i:j])
            i = j
        elif src[i] == "'":
            j = i + 1
            while j < n and src[j] != "'":
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


def code_only(src: str) -> str:
    """Comments and string literals blanked: for delimiter matching."""
    src = strip_comments(src)
    return re.sub(r"'(?:\\.|[^'\\])*'", lambda m: "'" + " " * (len(m.group()) - 2) + "'", src)


def block_at(code: str, open_index: int) -> tuple[int, int]:
    """(start, end) of the {...} or [...] block whose opening bracket is at open_index."""
    pairs = {"{": "}", "[": "]", "(": ")"}
    stack = []
    for i in range(open_index, len(code)):
        ch = code[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif ch in pairs.values():
            assert stack and stack.pop() == ch, f"unbalanced {ch!r} at offset {i}"
            if not stack:
                return open_index, i
    raise AssertionError(f"unclosed block from offset {open_index}")


def top_level_keys(code: str, start: int, end: int) -> list[str]:
    """Property names at depth 1 of the object literal code[start:end+1]."""
    keys, depth, line_start = [], 0, True
    i = start
    while i <= end:
        ch = code[i]
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == "\n":
            line_start = True
            i += 1
            continue
        if depth == 1 and line_start and not ch.isspace():
            m = re.match(r"('[^']*'|[A-Za-z_][A-Za-z0-9_]*)\s*:", code[i:])
            if m:
                keys.append(m.group(1).strip("'"))
            line_start = False
        elif not ch.isspace():
            line_start = False
        i += 1
    return keys


def declarations(path: Path) -> tuple[dict[str, bool], set[str]]:
    """({param: required}, {output}) declared in a Bicep file."""
    code = strip_comments(path.read_text())
    params = {}
    for m in re.finditer(r"^param\s+(\w+)\s+([\w.]+)(\?)?([^\n=]*)(=)?", code, re.M):
        params[m.group(1)] = not (m.group(3) or m.group(5))
    outputs = set(re.findall(r"^output\s+(\w+)\s+", code, re.M))
    return params, outputs


def modules(path: Path) -> list[tuple[str, Path, list[str]]]:
    """(symbol, module file, params given) for each `module` in a Bicep file."""
    src = strip_comments(path.read_text())
    code = code_only(path.read_text())
    found = []
    for m in re.finditer(r"^module\s+(\w+)\s+'([^']+)'\s*=\s*(?:if\s*\([^\n]*\)\s*)?\{", src, re.M):
        start, end = block_at(code, m.end() - 1)
        body = code[start : end + 1]
        pm = re.search(r"\n\s*params\s*:\s*\{", body)
        given = []
        if pm:
            pstart, pend = block_at(code, start + pm.end() - 1)
            given = top_level_keys(code, pstart, pend)
        found.append((m.group(1), (path.parent / m.group(2)).resolve(), given))
    return found


def app_setting_keys() -> dict[str, list[Path]]:
    """Names set as app settings anywhere in infra/ (UPPER_CASE or AzureWebJobsStorage__* keys)."""
    keys: dict[str, list[Path]] = {}
    for path in bicep_files():
        code = strip_comments(path.read_text())
        for name in re.findall(r"^\s*([A-Z][A-Z0-9_]+|AzureWebJobsStorage__\w+)\s*:", code, re.M):
            keys.setdefault(name, []).append(path)
    return keys


# ---- azure.yaml ----------------------------------------------------------------------------------


def yaml_mapping(text: str) -> dict:
    """The block-mapping subset of YAML that azure.yaml uses (no lists, no flow style)."""
    root: dict = {}
    stack = [(-1, root)]
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        value = value.strip()
        if value:
            parent[key] = value.strip("'\"")
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def load_azure_yaml() -> dict:
    text = (ROOT / "azure.yaml").read_text()
    try:
        import yaml
    except ImportError:  # PyYAML is a runtime dependency today; the subset parser keeps this independent
        return yaml_mapping(text)
    return yaml.safe_load(text)


def test_azure_yaml_names_the_api_service_infra_and_hook():
    doc = load_azure_yaml()
    assert doc == yaml_mapping((ROOT / "azure.yaml").read_text())
    assert doc["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    api = doc["services"]["api"]
    assert api == {"project": ".", "language": "python", "host": "function"}
    hook = doc["hooks"]["postdeploy"]
    assert hook["posix"]["run"] == "./infra/hooks/postdeploy.sh" and HOOK_SH.is_file()
    assert hook["windows"]["run"] == "./infra/hooks/postdeploy.ps1" and HOOK_PS1.is_file()
    # azd deploys the `api` service to the resource tagged with its name.
    assert "'azd-service-name': serviceName" in (INFRA / "app/api.bicep").read_text()
    assert "var serviceName = 'api'" in (INFRA / "app/api.bicep").read_text()
    # A project-relative service and the root requirements.txt: what azd packages for Python.
    assert (ROOT / "requirements.txt").is_file() and (ROOT / "function_app.py").is_file()


# ---- settings contract ---------------------------------------------------------------------------


def test_every_setting_the_service_reads_is_set_by_infra():
    # Every app setting the service reads is in the table (test_settings_table.py holds the sample
    # and function_app.py's %NAME% bindings to it).
    wanted = set(settings.SETTING_NAMES) - KEY_SETTINGS - UNSET_IN_AZURE
    assert {"AUTH_ISSUER", "ACS_ENDPOINT", "TABLES_ENDPOINT", "CLEANUP_SCHEDULE"} <= wanted
    missing = sorted(wanted - set(app_setting_keys()))
    assert not missing, f"add these app settings to infra/main.bicep (serviceSettings): {missing}"


def test_sample_host_values_match_the_local_stack():
    """`func start` with the copied sample reaches the HTTPS Azurite that `make run` starts."""
    from devstack import azurite
    from devstack.layout import Ports

    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    # The host enables worker indexing without the flag (Utility.CanWorkerIndex: the platform's
    # WORKER_INDEXING_ENABLED hosting config); the sample no longer carries the obsolete flag.
    assert "AzureWebJobsFeatureFlags" not in values
    assert "EnableWorkerIndexing" not in json.dumps(values)
    # UseDevelopmentStorage=true means plain http; the stack's Azurite speaks HTTPS only.
    ports = Ports()
    stack = azurite.connection_string(azurite.AzuritePorts(ports.blob, ports.queue, ports.table))
    assert values["AzureWebJobsStorage"] == stack
    assert values["TABLES_ENDPOINT"] == azurite.endpoint(ports.table)
    assert "UseDevelopmentStorage" not in json.dumps(values)


def test_infra_never_sets_what_the_platform_sets():
    """An app setting WEBSITE_AUTH_ENABLED=True would make easyauth trust headers nobody strips."""
    code = "\n".join(strip_comments(p.read_text()) for p in bicep_files())
    for name in PLATFORM_SETTINGS:
        assert name not in app_setting_keys(), name
        assert not re.search(rf"['\"]?\b{name}['\"]?\s*:", code), f"{name} is set somewhere in infra/"


def test_issuer_and_audience_are_required_only_for_jwt_mode():
    """easyauth needs neither (Easy Auth validates sign-ins); jwt without them gets a 503 naming them."""
    declared, _ = declarations(MAIN)
    assert declared["authIssuer"] is False and declared["authAudience"] is False
    main = strip_comments(MAIN.read_text())
    assert "param authIssuer string = ''" in main and "param authAudience string = ''" in main
    for param in ("authIssuer", "authAudience"):
        assert not re.search(rf"@minLength\(1\)\s*(@description\([^\n]*\)\s*)?param {param}\b", main), param
    allowed = re.search(r"@allowed\(\[([^\]]*)\]\)\s*@description\([^\n]*\)\s*param authMode", main)
    assert {"jwt", "easyauth"} == set(re.findall(r"'(\w+)'", allowed.group(1)))
    assert "AUTH_ISSUER: authIssuer" in main and "AUTH_AUDIENCE: authAudience" in main
    from shared.errors import SettingError
    from shared.settings import load

    base = {"ACS_ENDPOINT": "https://acs.example/", "TABLES_ENDPOINT": "https://t.example/"}
    easy = {"AUTH_MODE": "easyauth", "AUTH_ISSUER": "", "AUTH_AUDIENCE": "", "WEBSITE_AUTH_ENABLED": "True"}
    assert load({**base, **easy}).auth_mode == "easyauth"
    with pytest.raises(SettingError) as caught:
        load({**base, "AUTH_MODE": "jwt", "AUTH_ISSUER": "", "AUTH_AUDIENCE": ""})
    assert caught.value.setting == "AUTH_ISSUER"


def test_no_key_setting_and_no_key_anywhere_in_infra():
    keys = app_setting_keys()
    # Host storage is identity-based in Azure (AzureWebJobsStorage__*), never a connection string.
    for name in KEY_SETTINGS | UNSET_IN_AZURE | {"AzureWebJobsStorage"}:
        assert name not in keys, f"{name} must not be an app setting in Azure"
    for path in [*infra_text_files(), ROOT / "azure.yaml"]:
        text = path.read_text()
        if path.suffix == ".bicep":
            text = strip_comments(text)  # comments may say which settings are left out, and why
        for name in KEY_SETTINGS:
            assert name not in text, f"{path}: mentions {name}"
        for pattern in (
            r"(?i)listkeys",
            r"(?i)AccountKey=",
            r"(?i)SharedAccessKey",
            r"(?i)primaryKey",
            r"(?i)secondaryKey",
            r"(?i)InstrumentationKey",
        ):
            assert not re.search(pattern, text), f"{path}: {pattern} (no key may be read or set)"
    code = "\n".join(strip_comments(p.read_text()) for p in bicep_files())
    # The only connection string is Application Insights' (it names the resource; not a secret).
    conn = set(re.findall(r"\b(\w*CONNECTION_STRING\w*)\b", code))
    assert conn == {"APPLICATIONINSIGHTS_CONNECTION_STRING"}


def test_identity_based_host_storage_and_monitoring():
    host = strip_comments((INFRA / "core/host/functions-flexconsumption.bicep").read_text())
    assert "AzureWebJobsStorage__accountName: storage.name" in host
    assert "AzureWebJobsStorage__credential: 'managedidentity'" in host
    assert "APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD'" in host
    storage = strip_comments((INFRA / "core/storage/storage-account.bicep").read_text())
    assert re.search(r"allowSharedKeyAccess:\s*false", storage)
    assert re.search(r"allowBlobPublicAccess:\s*false", storage)
    assert "allowSharedKeyAccess: true" not in "\n".join(p.read_text() for p in bicep_files())
    monitoring = strip_comments((INFRA / "core/monitor/monitoring.bicep").read_text())
    assert re.search(r"DisableLocalAuth:\s*true", monitoring)
    topic = strip_comments((INFRA / "core/events/eventgrid-topic.bicep").read_text())
    assert re.search(r"disableLocalAuth:\s*true", topic)
    main = strip_comments(MAIN.read_text())
    assert "ACS_ENDPOINT: acs.outputs.endpoint" in main
    assert "TABLES_ENDPOINT: storage.outputs.tableEndpoint" in main
    acs = strip_comments((INFRA / "core/communication/communication-services.bicep").read_text())
    assert "'https://${communicationService.properties.hostName}/'" in acs


def test_role_assignments_for_the_function_identity():
    rbac = strip_comments((INFRA / "app/rbac.bicep").read_text())
    code = code_only((INFRA / "app/rbac.bicep").read_text())
    assignments = []
    for m in re.finditer(
        r"^resource\s+(\w+)\s+'Microsoft\.Authorization/roleAssignments@[\d-]+'\s*=\s*\{", rbac, re.M
    ):
        start, end = block_at(code, m.end() - 1)
        assignments.append(rbac[start : end + 1])
    scopes = {}
    for body in assignments:
        scope = re.search(r"scope:\s*(\w+)", body).group(1)
        role = re.search(r"roles\.(\w+)|(acsRoleDefinitionId)", body.split("properties", 1)[1])
        scopes[role.group(1) or role.group(2)] = scope
        assert "principalType: 'ServicePrincipal'" in body and "principalId: principalId" in body
    assert scopes == {
        "storageBlobDataOwner": "storage",
        "storageQueueDataContributor": "storage",
        "storageTableDataContributor": "storage",
        "monitoringMetricsPublisher": "applicationInsights",
        "acsRoleDefinitionId": "communicationService",
    }
    for key, role_id in ROLES.items():
        assert re.search(rf"{key}:\s*'{role_id}'", rbac), key
    main = strip_comments(MAIN.read_text())
    default = re.search(r"param acsRoleDefinitionId string = '([0-9a-f-]+)'", main).group(1)
    allowed = re.search(
        r"@allowed\(\[([^\]]*)\]\)\s*@description\([^\n]*\)\s*param acsRoleDefinitionId", main
    )
    assert default in ACS_ROLES.values()
    assert set(re.findall(r"'([0-9a-f-]{36})'", allowed.group(1))) <= set(ACS_ROLES.values())
    assert "principalId: api.outputs.identityPrincipalId" in main


def test_flex_consumption_python_313_with_system_assigned_identity():
    """3.13: the first Python whose worker runtime the app pins in requirements.txt (the dev host runs it)."""
    host = strip_comments((INFRA / "core/host/functions-flexconsumption.bicep").read_text())
    assert re.search(r"tier:\s*'FlexConsumption'", host) and re.search(r"name:\s*'FC1'", host)
    assert "kind: 'functionapp,linux'" in host and "reserved: true" in host
    assert re.search(r"identity:\s*\{\s*type:\s*'SystemAssigned'\s*\}", host)
    assert re.search(r"authentication:\s*\{\s*type:\s*'SystemAssignedIdentity'\s*\}", host)
    assert "type: 'blobContainer'" in host
    for key in ("maximumInstanceCount", "instanceMemoryMB"):
        assert re.search(rf"scaleAndConcurrency:\s*\{{[^}}]*{key}:", host)
    assert re.search(r"runtime:\s*\{\s*name:\s*runtimeName\s*version:\s*runtimeVersion\s*\}", host)
    api = strip_comments((INFRA / "app/api.bicep").read_text())
    assert "runtimeName: 'python'" in api and "runtimeVersion: '3.13'" in api
    assert re.search(r"@allowed\(\[\s*'3\.13'\s*\]\)\s*param runtimeVersion string = '3\.13'", host)
    assert "httpsOnly: true" in host


def test_cors_from_a_parameter_and_rate_limit_on_by_default():
    main = strip_comments(MAIN.read_text())
    host = strip_comments((INFRA / "core/host/functions-flexconsumption.bicep").read_text())
    assert re.search(r"cors:\s*\{\s*allowedOrigins:\s*corsAllowedOrigins\s*supportCredentials:\s*false", host)
    assert "param corsAllowedOrigins string = ''" in main
    assert "corsAllowedOrigins: corsOrigins" in main
    assert "param rateLimitPerMinute int = 30" in main
    assert "RATE_LIMIT_PER_MINUTE: string(rateLimitPerMinute)" in main
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params["rateLimitPerMinute"]["value"] == "${RATE_LIMIT_PER_MINUTE=30}"
    assert params["corsAllowedOrigins"]["value"] == "${CORS_ALLOWED_ORIGINS}"


# ---- Bicep structure -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_delimiters_balance_and_api_versions_are_pinned(path):
    code = code_only(path.read_text())
    i = 0
    while i < len(code):
        if code[i] in "{[(":
            _, end = block_at(code, i)
            i = end + 1
            continue
        assert code[i] not in "}])", f"{path}: stray {code[i]!r} at offset {i}"
        i += 1
    for ref in re.findall(
        r"'((?:Microsoft|microsoft)\.[A-Za-z]+/[A-Za-z/]+@[^']*)'", strip_comments(path.read_text())
    ):
        assert re.fullmatch(r"[\w.]+/[\w/]+@\d{4}-\d{2}-\d{2}(-preview)?", ref), ref


def test_modules_are_wired_to_what_they_declare():
    seen = set()
    for path in bicep_files():
        code = strip_comments(path.read_text())
        syms = {}
        for sym, target, given in modules(path):
            assert target.is_file(), f"{path}: module {sym} -> missing {target}"
            declared, outputs = declarations(target)
            unknown = set(given) - set(declared)
            assert not unknown, f"{path}: module {sym} passes undeclared params {sorted(unknown)}"
            missing = {p for p, required in declared.items() if required} - set(given)
            assert not missing, f"{path}: module {sym} lacks required params {sorted(missing)}"
            syms[sym] = outputs
            seen.add(target)
        for sym, out in re.findall(r"\b(\w+)\.outputs\.(\w+)", code):
            assert sym in syms, f"{path}: {sym}.outputs.{out} but no module {sym}"
            assert out in syms[sym], f"{path}: module {sym} has no output {out}"
    assert seen == set(bicep_files()) - {MAIN.resolve()}, "every Bicep file is used from main.bicep"


def test_parameters_file_matches_main():
    declared, _ = declarations(MAIN)
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert set(params) <= set(declared), sorted(set(params) - set(declared))
    assert {p for p, required in declared.items() if required} <= set(params)
    assert params["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert params["location"]["value"] == "${AZURE_LOCATION}"
    assert params["authIssuer"]["value"] == "${AUTH_ISSUER}"
    assert params["authAudience"]["value"] == "${AUTH_AUDIENCE}"
    main = strip_comments(MAIN.read_text())
    assert main.lstrip().startswith("targetScope = 'subscription'")
    # The outputs the postdeploy hook reads.
    for out in ("AZURE_RESOURCE_GROUP", "AZURE_FUNCTION_APP_NAME", "EVENTS_TOPIC_ID", "APP_EVENT_TYPES"):
        assert re.search(rf"^output {out} string", main, re.M), out


def test_bicep_files_parse_with_pycep_when_available():
    pycep = pytest.importorskip("pycep", reason="pycep-parser (PyPI) is not installed: syntax parse skipped")
    for path in bicep_files():
        pycep.BicepParser().parse(text=path.read_text())


def test_main_builds_with_a_bicep_compiler_when_available(tmp_path):
    bicep = shutil.which("bicep")
    if bicep is None:
        pytest.skip("no Bicep compiler on PATH (none is installable from PyPI, npm or Debian here)")
    subprocess.run([bicep, "build", str(MAIN), "--outdir", str(tmp_path)], check=True, timeout=300)
    template = json.loads((tmp_path / "main.json").read_text())
    assert template["$schema"].endswith("subscriptionDeploymentTemplate.json#")


# ---- postdeploy hook -----------------------------------------------------------------------------


def test_hook_never_prints_the_key():
    text = HOOK_SH.read_text()
    assert HOOK_SH.stat().st_mode & stat.S_IXUSR, "postdeploy.sh must be executable"
    assert "set -x" not in text
    for line in text.splitlines():
        if re.search(r"\b(echo|printf)\b", line):
            printed = line.replace('awk -v k="$KEY"', "")  # mask() takes the key to hide it
            assert not re.search(r"\$\{?(KEY|ENDPOINT)\b", printed), line
    assert "--function-name events" in text and "/api/events?code=$KEY" in text
    ps1 = HOOK_PS1.read_text()
    assert "--function-name events" in ps1 and "Replace($key, '***')" in ps1
    for line in ps1.splitlines():
        if "Write-Host" in line:
            assert not re.search(r"\$(key|endpoint)\b", line.replace("Replace($key", ""), re.I), line


FAKE_AZ = """#!/bin/sh
echo "$*" >> "$AZ_LOG"
case "$*" in
  "functionapp function keys list"*) echo "$FAKE_KEY";;
  "functionapp show"*) echo "func-api-test.azurewebsites.net";;
  "eventgrid partner topic show"*"--query id"*) echo "$PARTNER_TOPIC_ID";;
  "eventgrid partner topic show"*) echo "$PARTNER_STATE";;
  "rest --method get"*"identity.principalId"*) echo "$TOPIC_PRINCIPAL";;
  *"event-subscription create"*)
    if [ -n "$FAIL" ]; then
      echo "ERROR: Webhook validation handshake failed for" \\
           "https://func-api-test.azurewebsites.net/api/events?code=$FAKE_KEY" >&2
      exit 1
    fi;;
esac
"""


PARTNER_TOPIC_ID = (
    "/subscriptions/s/resourceGroups/rg-test/providers/Microsoft.EventGrid/partnerTopics/graph-users"
)
DEADLETTER_ACCOUNT = (
    "/subscriptions/s/resourceGroups/rg-test/providers/Microsoft.Storage/storageAccounts/sttest"
)
DEADLETTER_CONTAINER = f"{DEADLETTER_ACCOUNT}/blobServices/default/containers/eventgrid-deadletter"
STORAGE_BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"  # built-in role id (azure-docs)


@pytest.fixture
def run_hook(tmp_path):
    sh = shutil.which("sh")
    if sys.platform == "win32" or sh is None:
        pytest.skip("needs a POSIX sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "az").write_text(FAKE_AZ)
    (fake / "az").chmod(0o755)
    log = tmp_path / "az.log"

    def run(**env):
        full = {
            "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
            "AZ_LOG": str(log),
            "FAKE_KEY": "k3y-Sample_value==",
            "PARTNER_STATE": "Activated",
            "PARTNER_TOPIC_ID": PARTNER_TOPIC_ID,
            "TOPIC_PRINCIPAL": "7a1b2c3d-0000-4000-8000-00000000d1e7",
            "EVENTS_DEADLETTER_CONTAINER_ID": DEADLETTER_CONTAINER,
            "FAIL": "",
            "POSTDEPLOY_RETRY_DELAY": "0",
            "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
            "AZURE_RESOURCE_GROUP": "rg-test",
            "AZURE_FUNCTION_APP_NAME": "func-api-test",
            **env,
        }
        proc = subprocess.run([sh, str(HOOK_SH)], env=full, capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, calls

    return run


def test_hook_subscribes_the_webhook_to_the_topic_and_the_graph_partner_topic(run_hook):
    proc, calls = run_hook(
        EVENTS_TOPIC_ID="/subscriptions/s/resourceGroups/rg-test/providers/Microsoft.EventGrid/topics/evgt",
        APP_EVENT_TYPES="MyApp.UserDeleted,MyApp.CredentialsChanged",
        GRAPH_PARTNER_TOPIC="graph-users",
    )
    assert proc.returncode == 0, proc.stderr
    assert "k3y-Sample_value" not in proc.stdout + proc.stderr
    [topic] = [c for c in calls if c.startswith("eventgrid event-subscription create")]
    assert "--endpoint https://func-api-test.azurewebsites.net/api/events?code=k3y-Sample_value==" in topic
    assert "--included-event-types MyApp.UserDeleted MyApp.CredentialsChanged" in topic
    assert "--subscription 00000000-0000-0000-0000-000000000000" in topic
    [graph] = [c for c in calls if c.startswith("eventgrid partner topic event-subscription create")]
    assert "--partner-topic-name graph-users" in graph
    assert "--included-event-types Microsoft.Graph.UserUpdated Microsoft.Graph.UserDeleted" in graph
    assert "--event-delivery-schema cloudeventschemav1_0" in graph


def test_hook_masks_the_key_in_errors_and_fails(run_hook):
    proc, calls = run_hook(EVENTS_TOPIC_ID="/topics/evgt", FAIL="1")
    assert proc.returncode == 1
    assert "code=***" in proc.stderr
    assert "k3y-Sample_value" not in proc.stdout + proc.stderr
    assert sum(c.startswith("eventgrid event-subscription create") for c in calls) == 3  # retried


def test_hook_waits_for_an_activated_partner_topic(run_hook):
    proc, calls = run_hook(GRAPH_PARTNER_TOPIC="graph-users", PARTNER_STATE="NeverActivated")
    assert proc.returncode == 1 and "not Activated" in proc.stderr
    assert not any("event-subscription create" in c for c in calls)


def test_hook_can_be_switched_off(run_hook):
    proc, calls = run_hook(EVENTS_TOPIC_ID="/topics/evgt", EVENTS_SUBSCRIPTION_ENABLED="false")
    assert proc.returncode == 0 and calls == []


def test_readme_explains_the_deployment():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy to Azure", 1)[1]
    for needle in (
        "azd up",
        "AUTH_ISSUER",
        "CORS_ALLOWED_ORIGINS",
        "RATE_LIMIT_PER_MINUTE",
        "EventGrid:?azuresubscriptionid=",
        "Microsoft.Graph.UserDeleted",
        "GRAPH_PARTNER_TOPIC",
    ):
        assert needle in section, needle


def test_function_timeout_outlasts_the_cleanup_runs_slowest_finish_and_no_more():
    """Past functionTimeout the host restarts the worker and ends every invocation in flight on the
    instance (WebScriptHostExceptionHandler.OnTimeoutExceptionAsync): the cleanup timer must finish
    first, however slow ACS and Table Storage answer. A run stops taking work after its deadline;
    a work item taken just before it makes one ACS call (TIMER_OPTIONS: a retry, each attempt up
    to the connect and read timeouts) and then up to three Table writes (each up to
    TABLE_CLIENT_OPTIONS' attempts). Flex Consumption's default, 30 minutes, would let a hung
    invocation hold the worker that long; and HTTP calls end at the front end's 230 s anyway."""
    import inspect

    from devstack.host_config import parse_function_timeout
    from shared.cleanup import TIMER_OPTIONS, Cleanup
    from shared.compose import ACS_CLIENT_OPTIONS, TABLE_CLIENT_OPTIONS

    host = json.loads((ROOT / "host.json").read_text())
    timeout = parse_function_timeout(host["functionTimeout"])
    deadline = inspect.signature(Cleanup.run).parameters["deadline_seconds"].default

    def attempts(options: dict, total: int) -> float:
        per_try = options["connection_timeout"] + options["read_timeout"]
        backoff = sum(options["retry_backoff_factor"] * 2**i for i in range(total))
        return (total + 1) * per_try + backoff

    acs_call = attempts(ACS_CLIENT_OPTIONS, TIMER_OPTIONS["retry_total"])
    table_write = attempts(TABLE_CLIENT_OPTIONS, TABLE_CLIENT_OPTIONS["retry_total"])
    slowest = deadline + acs_call + 3 * table_write
    assert timeout is not None and slowest < timeout <= 30 * 60, (slowest, timeout)
    assert "Host.Results" not in host["logging"]["logLevel"]  # it hid successful invocations' requests


# ---- dead-lettering and the Graph subscription (issue 14, items 6 and 8) -------------------------
# Event Grid never retries a 400/401/403/413 and drops an undeliverable event unless the event
# subscription has a dead-letter destination (Microsoft Learn, "Event Grid message delivery and
# retry"). Identity-based dead-lettering: `--deadletter-identity systemassigned
# --deadletter-identity-endpoint <container id>`, the topic's identity holding Storage Blob Data
# Contributor ("Deliver events using managed identity", MicrosoftDocs/azure-docs
# articles/event-grid/managed-service-identity.md); the CLI's partner-topic command has no such
# option (azure-cli eventgrid/custom.py passes deadletter_identity=None), hence the PATCH.


def _graph_hook_run(run_hook, **env):
    return run_hook(
        EVENTS_TOPIC_ID="/subscriptions/s/resourceGroups/rg-test/providers/Microsoft.EventGrid/topics/evgt",
        APP_EVENT_TYPES="MyApp.UserDeleted",
        GRAPH_PARTNER_TOPIC="graph-users",
        **env,
    )


def test_hook_dead_letters_both_subscriptions_with_the_topics_identity(run_hook):
    proc, calls = _graph_hook_run(run_hook)
    assert proc.returncode == 0, proc.stderr
    assert "k3y-Sample_value" not in proc.stdout + proc.stderr
    topic_id = "/subscriptions/s/resourceGroups/rg-test/providers/Microsoft.EventGrid/topics/evgt"
    for resource in (topic_id, PARTNER_TOPIC_ID):
        [identity] = [c for c in calls if c.startswith(f"rest --method patch --url {resource}?api-version=")]
        assert '{"identity": {"type": "SystemAssigned"}}' in identity
        assert f"rest --method get --url {resource}?api-version=" in "\n".join(calls)
    grants = [c for c in calls if c.startswith("role assignment create")]
    assert len(grants) == 2
    for grant in grants:
        assert "--assignee-object-id 7a1b2c3d-0000-4000-8000-00000000d1e7" in grant
        assert "--assignee-principal-type ServicePrincipal" in grant
        assert f"--role {STORAGE_BLOB_DATA_CONTRIBUTOR}" in grant
        assert f"--scope {DEADLETTER_CONTAINER}" in grant  # the container only, not the account
    [topic] = [c for c in calls if c.startswith("eventgrid event-subscription create")]
    assert (
        f"--deadletter-identity systemassigned --deadletter-identity-endpoint {DEADLETTER_CONTAINER}" in topic
    )
    assert "--deadletter-endpoint" not in topic.replace(
        "--deadletter-identity-endpoint", ""
    )  # no key-based one
    # Access first, then the subscription: Event Grid writes dead letters with that identity.
    assert calls.index(grants[0]) < calls.index(topic)
    [graph] = [c for c in calls if c.startswith("eventgrid partner topic event-subscription create")]
    assert calls.index(grants[1]) < calls.index(graph)
    [patch] = [
        c for c in calls if c.startswith(f"rest --method patch --url {PARTNER_TOPIC_ID}/eventSubscriptions/")
    ]
    assert calls.index(graph) < calls.index(patch)
    assert f"{PARTNER_TOPIC_ID}/eventSubscriptions/acs-token-service?api-version=" in patch
    body = json.loads(patch.split("--body ", 1)[1].split(" --only-show-errors")[0])
    assert body == {
        "deadLetterWithResourceIdentity": {
            "identity": {"type": "SystemAssigned"},
            "deadLetterDestination": {
                "endpointType": "StorageBlob",
                "properties": {"resourceId": DEADLETTER_ACCOUNT, "blobContainerName": "eventgrid-deadletter"},
            },
        }
    }
    # Graph's lifecycle notification reaches the webhook too (shared/graph/ renews on it).
    assert (
        "--included-event-types Microsoft.Graph.UserUpdated Microsoft.Graph.UserDeleted "
        "Microsoft.Graph.SubscriptionReauthorizationRequired" in graph
    )


def test_hook_refuses_to_subscribe_without_a_dead_letter_container(run_hook):
    for value in ("", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/st"):
        proc, calls = _graph_hook_run(run_hook, EVENTS_DEADLETTER_CONTAINER_ID=value)
        assert proc.returncode == 1 and "EVENTS_DEADLETTER_CONTAINER_ID" in proc.stderr
        assert not any("event-subscription create" in c for c in calls)


def test_hook_never_subscribes_without_dead_letter_access(run_hook):
    """A topic whose identity cannot be had gets no subscription that would drop events again."""
    proc, calls = _graph_hook_run(run_hook, TOPIC_PRINCIPAL="")
    assert proc.returncode == 1 and "no system-assigned identity" in proc.stderr
    assert not any("event-subscription create" in c for c in calls)
    assert not any(c.startswith("role assignment create") for c in calls)


def test_powershell_hook_does_the_same_dead_lettering():
    ps1 = HOOK_PS1.read_text()
    for needle in (
        "EVENTS_DEADLETTER_CONTAINER_ID",
        "'--deadletter-identity', 'systemassigned', '--deadletter-identity-endpoint', $dlContainer",
        "'--role', $blobDataContributor, '--scope', $dlContainer",
        f"$blobDataContributor = '{STORAGE_BLOB_DATA_CONTRIBUTOR}'",
        "deadLetterWithResourceIdentity",
        "endpointType = 'StorageBlob'",
        "/eventSubscriptions/${name}?api-version=$egApi",
        '{"identity": {"type": "SystemAssigned"}}',
        "Microsoft.Graph.SubscriptionReauthorizationRequired",
    ):
        assert needle in ps1, needle
    sh = HOOK_SH.read_text()
    assert f'BLOB_DATA_CONTRIBUTOR="{STORAGE_BLOB_DATA_CONTRIBUTOR}"' in sh
    assert re.search(r"EG_API=\"(\d{4}-\d{2}-\d{2})\"", sh).group(1) == re.search(
        r"\$egApi = '(\d{4}-\d{2}-\d{2})'", ps1
    ).group(1)


def test_infra_makes_the_dead_letter_container_and_keeps_the_topic_identity():
    main = strip_comments(MAIN.read_text())
    name = re.search(r"var deadLetterContainerName = '([a-z0-9-]+)'", main).group(1)
    assert 3 <= len(name) <= 63  # a blob container name
    containers = re.search(r"containers:\s*\[([^\]]*)\]", main).group(1).split()
    assert "deadLetterContainerName" in containers and "deploymentStorageContainerName" in containers
    assert (
        "output EVENTS_DEADLETTER_CONTAINER_ID string = "
        "'${storage.outputs.id}/blobServices/default/containers/${deadLetterContainerName}'" in main
    )
    # Without it in Bicep, a new `azd provision` would drop the identity postdeploy turned on,
    # and with it the principal the role assignment names.
    topic = strip_comments((INFRA / "core/events/eventgrid-topic.bicep").read_text())
    assert re.search(r"identity:\s*\{\s*type:\s*'SystemAssigned'\s*\}", topic)


def test_infra_tells_the_app_where_graph_delivers():
    main = strip_comments(MAIN.read_text())
    assert "param graphPartnerTopic string = ''" in main
    assert "param graphEndpoint string = 'https://graph.microsoft.com'" in main
    assert "GRAPH_ENDPOINT: graphEndpoint" in main and "GRAPH_NOTIFICATION_URL: graphNotificationUrl" in main
    url = re.search(r"var graphNotificationUrl = empty\(graphPartnerTopic\) \? '' : '([^']+)'", main).group(1)
    assert url == (
        "EventGrid:?azuresubscriptionid=${subscription().subscriptionId}&resourcegroup=${rg.name}"
        "&partnertopic=${graphPartnerTopic}&location=${location}"
    )
    from shared.errors import SettingError
    from shared.settings import load

    # What infra builds, with values filled in, is what the service accepts.
    base = {
        "AUTH_ISSUER": "https://login.example.com/",
        "AUTH_AUDIENCE": "api://x",
        "ACS_ENDPOINT": "https://a/",
    }
    base["TABLES_ENDPOINT"] = "https://t/"
    filled = url.replace("${subscription().subscriptionId}", "sub").replace("${rg.name}", "rg")
    filled = filled.replace("${graphPartnerTopic}", "graph-users").replace("${location}", "westus")
    assert load({**base, "GRAPH_NOTIFICATION_URL": filled}).graph_notification_url == filled
    with pytest.raises(SettingError):
        load({**base, "GRAPH_NOTIFICATION_URL": "https://example.com/hook"})
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params["graphPartnerTopic"]["value"] == "${GRAPH_PARTNER_TOPIC}"
    assert params["graphEndpoint"]["value"] == "${GRAPH_ENDPOINT=https://graph.microsoft.com}"


def test_graph_upkeep_runs_beside_the_cleanup_work_within_the_function_timeout():
    """The timer renews or creates the Graph subscription concurrently with its other work, so the
    slowest path there (a Table read, a PATCH that finds the subscription gone, a write, a POST, a
    write) must also finish before functionTimeout."""
    import inspect

    from devstack.host_config import parse_function_timeout
    from shared.cleanup import Cleanup
    from shared.compose import TABLE_CLIENT_OPTIONS
    from shared.graph.client import GRAPH_OPTIONS, TIMEOUTS

    assert "asyncio.create_task(self._graph(self.graph, counts))" in inspect.getsource(Cleanup.run)
    timeout = parse_function_timeout(json.loads((ROOT / "host.json").read_text())["functionTimeout"])

    def attempts(options: dict, timeouts: dict) -> float:
        total = options["retry_total"]
        backoff = sum(
            min(options["retry_backoff_factor"] * 2**i, options.get("retry_backoff_max", 120))
            for i in range(total)
        )
        return (total + 1) * (timeouts["connection_timeout"] + timeouts["read_timeout"]) + backoff

    graph_call = attempts(GRAPH_OPTIONS, TIMEOUTS)
    table_call = attempts(TABLE_CLIENT_OPTIONS, TABLE_CLIENT_OPTIONS)
    slowest = 3 * table_call + 2 * graph_call
    assert timeout is not None and slowest < timeout, (slowest, timeout)
    # And the webhook answers Event Grid within its 30 s: one Graph call, retries included.
    assert graph_call < 30


def test_readme_explains_dead_letters_and_the_graph_subscription():
    readme = (ROOT / "README.md").read_text()
    deploy = readme.split("## Deploy to Azure", 1)[1]
    for needle in (
        "EVENTS_DEADLETTER_CONTAINER_ID",
        "--deadletter-identity systemassigned",
        "Storage Blob Data Contributor on the container only",
        "#### Replaying dead-lettered events",
        "az storage blob download --auth-mode login",
        "application/cloudevents-batch+json",
        "User.Read.All",
        "df021288-bdef-4463-88db-98f22de89214",  # User.Read.All's app role id in Microsoft Graph
        "/appRoleAssignments",
        "Microsoft.Graph.SubscriptionReauthorizationRequired",
        "GRAPH_NOTIFICATION_URL",
    ):
        assert needle in deploy, needle
    for needle in (
        "#### Keeping the Graph subscription alive",
        "graphSubscription",
        "PATCH /v1.0/subscriptions/{id}",
    ):
        assert needle in readme, needle
