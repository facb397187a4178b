"""The supported Python versions are stated once per place that needs them (pyproject's
classifiers and requires-python, tox.ini, .ci/run, docs/contributing.md); these checks keep
the places in step, so adding a version to one and not the others fails."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli where the standard library has no tomllib
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _classified() -> list[tuple[int, int]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = [
        re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c)
        for c in project["classifiers"]
    ]
    return sorted((3, int(m.group(1))) for m in found if m)


def _tox() -> configparser.ConfigParser:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    return tox


def _pyenv_builds() -> dict[tuple[int, int], str]:
    """The pyenv version each tox env falls back to, by (major, minor)."""
    tox, builds = _tox(), {}
    for section in tox.sections():
        env = re.fullmatch(r"testenv:py3(\d+)", section)
        if env:
            path = tox[section]["base_python"].split(",")[-1].strip()
            build = re.search(r"/versions/(3\.\d+\.\d+)/bin/python(3\.\d+)$", path)
            assert build, (section, path)
            assert build.group(1).startswith(build.group(2) + "."), path
            builds[(3, int(env.group(1)))] = build.group(1)
    return builds


def test_requires_python_starts_at_the_oldest_classified_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    oldest = _classified()[0]
    assert project["requires-python"] == f">={oldest[0]}.{oldest[1]}"
    assert sys.version_info[:2] >= oldest


def test_tox_has_an_env_per_classified_version() -> None:
    classified = _classified()
    assert classified == [(3, m) for m in range(classified[0][1], classified[-1][1] + 1)]
    labels = _tox()["tox"]["labels"]
    pythons = re.search(r"pythons\s*=\s*(.+)", labels)
    assert pythons, labels
    listed = [e.strip() for e in pythons.group(1).split(",")]
    assert listed == [f"py3{minor}" for _, minor in classified]
    assert sorted(_pyenv_builds()) == classified


def test_ci_runs_the_oldest_and_newest_on_the_builds_tox_uses() -> None:
    builds = _pyenv_builds()
    classified = _classified()
    loop = re.search(r'^ci_pythons="([\d. ]+)"', (REPO / ".ci" / "run").read_text(), re.M)
    assert loop, "the list of versions in .ci/run"
    assert loop.group(1).split() == [builds[classified[0]], builds[classified[-1]]]


def test_contributing_lists_every_build() -> None:
    page = (REPO / "docs" / "contributing.md").read_text()
    for (major, minor), build in _pyenv_builds().items():
        path = f"/root/.pyenv/versions/{build}/bin/python{major}.{minor}"
        assert f"| py{major}{minor} | {path} |" in page
