"""What Azure deploys imports with what Azure installs, and nothing else.

Locally the worker runs in the development virtualenv, next to folders that .funcignore keeps out
of the deployment package (devstack/, tests/, bench/) and packages that only requirements-dev.txt
installs. An import of either works here and breaks the whole app's indexing in Azure. This test
copies the deployed files alone, and imports the app and every module of `shared/` in a Python that
refuses any module from a distribution requirements.txt does not bring in.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

GUARD = r"""
import importlib.abc, importlib.machinery, importlib.metadata, json, sys
allowed = set(json.loads(sys.argv[1]))
owner = {}
for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    for file in dist.files or ():
        owner[str(file.locate().resolve())] = name

class DeployedOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.origin:
            from pathlib import Path
            dist = owner.get(str(Path(spec.origin).resolve()))
            if dist is not None and dist not in allowed:
                raise ImportError(f"{fullname} comes from {dist}, which requirements.txt does not install")
        return None

sys.meta_path.insert(0, DeployedOnly())
import pkgutil
import function_app, shared
for module in pkgutil.walk_packages(shared.__path__, "shared."):
    __import__(module.name)
import azure_functions_runtime.loader as loader
names = [f.get_function_name() for f in loader.index_function_app("function_app.py")]
print(json.dumps(names))
"""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def installed_closure(requirements: Path) -> set[str]:
    """The distributions requirements.txt installs, with everything they require in turn."""
    todo = [
        Requirement(line.split("#")[0].strip())
        for line in requirements.read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith("-")
    ]
    found: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in found:
            continue
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform or Python (a marker said so)
        found.add(name)
        for text in requires:
            needed = Requirement(text)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(needed)
    return found


def deployed_files() -> list[str]:
    """Tracked files that .funcignore does not exclude, as `func azure functionapp publish` packs them."""
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        [shutil.which("git") or "git", "ls-files"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    def excluded(path: str) -> bool:
        parts = path.split("/")
        for pattern in patterns:
            bare = pattern.rstrip("/")
            if pattern.endswith("/") and bare in parts[:-1]:
                return True
            if fnmatch.fnmatch(path, bare) or any(fnmatch.fnmatch(part, bare) for part in parts):
                return True
        return False

    return [path for path in tracked if not excluded(path)]


def test_the_deployment_package_holds_the_app_and_not_the_dev_stack():
    files = deployed_files()
    assert {"function_app.py", "host.json", "requirements.txt", "shared/tokens.py"} <= set(files)
    assert not [f for f in files if f.startswith(("devstack/", "tests/", "bench/", ".ci/"))]


def test_the_deployed_app_imports_with_the_deployed_requirements_only(tmp_path):
    for path in deployed_files():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, target)
    allowed = installed_closure(REPO_ROOT / "requirements.txt")
    assert {"azure-functions", "azure-functions-runtime", "azure-data-tables"} <= allowed
    assert not {"pytest", "schemathesis", "azure-eventgrid", "protobuf", "grpcio-tools", "pillow"} & allowed
    import json

    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, '.'); exec({GUARD!r})",
            json.dumps(sorted(allowed)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "issue_token" in json.loads(result.stdout.splitlines()[-1])
