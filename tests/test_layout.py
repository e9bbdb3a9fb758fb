"""The code's shape (issue 17), checked as the tree stands: small modules, each named in the
README's layout, errors answered in one place, tests that reach the service through its public
interface, and a type checker in the lint CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in (ROOT / "shared").rglob("*.py") if p.name != "__init__.py")
MAX_LINES = 310  # "no module over ~300 lines"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_small_and_named_in_the_readme_layout(module: Path):
    lines = len(module.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module.relative_to(ROOT)} has {lines} lines"
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Deploy to Azure")]
    relative = str(module.relative_to(ROOT))
    named = f"`{relative}`" if module.parent.name == "shared" else f"`{module.name}`"
    assert named in layout, f"README's Layout does not name {relative}"


def test_errors_become_responses_in_one_place():
    """Only shared/http/problems.py builds a problem+json answer."""
    builders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "shared").rglob("*.py")
        if 'mimetype="application/problem+json"' in p.read_text()
    ]
    assert builders == ["shared/http/problems.py"]


def test_no_test_calls_a_private_method_of_the_service():
    service_objects = (
        r"(tokens|store|cleanup|revocation|identities|pending|retention|lookups|issuer|sessions|jwks"
        r"|graph|gateway|services\(\))"
    )
    private_call = re.compile(rf"\b{service_objects}\._[a-z]\w*\(")
    offenders = [
        f"{p.name}:{n}"
        for p in (ROOT / "tests").glob("test_*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if private_call.search(line)
    ]
    assert offenders == []


def test_lint_checks_types_and_ci_runs_lint():
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:") :].split("\n\n")[0]
    assert "-m mypy" in lint
    assert "make lint" in (ROOT / ".ci" / "run").read_text()
