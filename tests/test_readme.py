"""The README stays true: every setting and every metric the code has is documented there."""

from __future__ import annotations

import re

import shared.metrics  # noqa: F401 - registers the metrics
from shared.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    names = [f.alias for f in Settings.model_fields.values() if f.alias]
    assert [n for n in names if f"`{n}`" not in README] == []


def test_every_metric_is_documented() -> None:
    """Every metric family the code registers (as a scrape names it) has a row in the README."""
    from prometheus_client import REGISTRY

    suffix = {"counter": "_total"}
    names = sorted({f.name + suffix.get(f.type, "") for f in REGISTRY.collect()
                    if f.name.startswith("callbridge_")})
    declared = re.findall(r'"(callbridge_[a-z_]+)"', (ROOT / "shared" / "metrics.py").read_text())
    assert len(names) >= len(declared) > 0
    assert [n for n in names if f"`{n}`" not in README] == []


def test_readme_gives_the_test_command_ci_runs() -> None:
    assert 'pip install -e ".[test]" && pytest' in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "pytest" in ci
