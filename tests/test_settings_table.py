"""The settings table is the one list of app settings: the sample, the bindings and the README follow it.

Other tests (test_infra.py, the fixtures, the bench) take names from `settings.TABLE`, so a setting
added there is checked everywhere; these tests hold the files that cannot import it to the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from devstack.service_settings import HOST_SETTINGS
from shared import settings

ROOT = Path(__file__).resolve().parent.parent


def test_each_setting_is_declared_once_and_bound_to_its_own_name():
    assert len(set(settings.SETTING_NAMES)) == len(settings.SETTING_NAMES)
    for setting in settings.TABLE:
        assert getattr(settings, setting.name) is setting, setting.name
    # The platform sets this one, never the operator: load reads it, the table leaves it out.
    assert settings.PLATFORM_AUTH_SETTING not in settings.SETTING_NAMES


def test_the_sample_lists_every_setting_and_nothing_else():
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())
    assert set(sample["Values"]) == set(settings.SETTING_NAMES) | set(HOST_SETTINGS)


def test_every_setting_a_binding_names_is_in_the_table():
    bound = set(re.findall(r"%([A-Za-z0-9_]+)%", (ROOT / "function_app.py").read_text()))
    assert bound, "function_app.py binds the cleanup schedule to %CLEANUP_SCHEDULE%"
    assert bound <= set(settings.SETTING_NAMES)


def test_the_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    undocumented = [name for name in settings.SETTING_NAMES if f"`{name}`" not in readme]
    assert not undocumented
