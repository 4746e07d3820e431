"""The install files agree: pyproject's lower bounds are the pins CI tests, and the lock satisfies every range."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def pins(name: str) -> dict[str, Version]:
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            found[canonicalize_name(package)] = Version(version)
    return found


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement} needs exactly one lower bound (>=)"
    return bounds[0]


def test_every_dependency_has_a_lower_bound_that_ci_installs() -> None:
    lowest = pins("constraints-lowest.txt")
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in lowest, f"{requirement.name} is not pinned in constraints-lowest.txt"
        assert lowest[name] == lower_bound(requirement), (
            f"{requirement.name}: pyproject's lower bound {lower_bound(requirement)} is not the tested {lowest[name]}"
        )
    assert len(lowest) == len({canonicalize_name(r.name) for r in requirements()}), "an unused pin"


def test_the_lock_satisfies_every_range() -> None:
    lock = pins("requirements.lock")
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement.name} is missing from requirements.lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"requirements.lock has {requirement.name}=={lock[name]}, outside {requirement.specifier}"
        )
