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

import pytest
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


def _imported_modules(path: Path) -> set[str]:
    """Absolute imports anywhere in a file, lazy ones inside functions included."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.slow
def test_every_distribution_the_deployed_code_imports_is_named_in_requirements():
    """A package reached only through another's dependencies can vanish or jump a major with it."""
    import importlib.util

    owner: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            owner[str(Path(file.locate()).resolve())] = _canonical(dist.metadata["Name"])
    named = {
        _canonical(Requirement(line.split("#")[0].strip()).name)
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith("-")
    }
    sources = [REPO_ROOT / "function_app.py", *sorted((REPO_ROOT / "shared").rglob("*.py"))]
    imported: dict[str, set[str]] = {}
    for source in sources:
        for module in _imported_modules(source):
            if module.split(".")[0] in ("shared", "function_app"):
                continue
            spec = importlib.util.find_spec(module)
            assert spec is not None, f"{source.name}: {module} is not installed"
            dist = owner.get(str(Path(spec.origin).resolve())) if spec.origin else None
            if dist is not None:  # None: the standard library
                imported.setdefault(dist, set()).add(module)
    assert {"azure-core", "opentelemetry-sdk", "azure-functions"} <= set(imported)
    missing = {dist: sorted(modules) for dist, modules in imported.items() if dist not in named}
    assert not missing, f"imported directly but not named in requirements.txt: {missing}"
