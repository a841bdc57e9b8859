"""The lock files agree with pyproject.toml: a dependency change without `make lock` fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
BUILD_REQUIREMENTS = ROOT / "deploy" / "build-requirements.in"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
FROM_PYPROJECT = "ews-call-gateway (pyproject.toml)"
STALE = "run `make lock` after changing pyproject.toml's dependencies"


def pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["project"]["dependencies"]]


def dev_requirements() -> list[Requirement]:
    dev = pyproject()["project"]["optional-dependencies"]["dev"]
    return runtime_requirements() + [Requirement(line) for line in dev]


def build_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["build-system"]["requires"]]


def locked(path: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """{package: (version, hashes, what it is there for)} as uv wrote them."""
    packages: dict[str, tuple[str, list[str], list[str]]] = {}
    current: list[str] = []
    hashes: list[str] = []
    for line in path.read_text().splitlines():
        pin = PIN.match(line)
        if pin:
            current, hashes = [], []
            packages[canonicalize_name(pin[1])] = (pin[2], hashes, current)
        elif "--hash=sha256:" in line:
            hashes.append(line.strip().rstrip(" \\"))
        elif line.startswith("    #") and packages:
            current.append(line.strip("# ").removeprefix("via").strip())
    return packages


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [(LOCK, runtime_requirements), (DEV_LOCK, dev_requirements)],
    ids=["image", "development"],
)
def test_every_requirement_of_pyproject_is_pinned_inside_its_range(
    lock: Path, requirements: object
) -> None:
    pins = locked(lock)
    for requirement in requirements() + build_requirements():  # type: ignore[operator]
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock.name}: {STALE}"
        version, hashes, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside {requirement}: {STALE}"
        )
        assert hashes, f"{name} has no hash in {lock.name}"


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [(LOCK, runtime_requirements), (DEV_LOCK, dev_requirements)],
    ids=["image", "development"],
)
def test_what_the_lock_takes_from_pyproject_is_exactly_what_pyproject_asks(
    lock: Path, requirements: object
) -> None:
    """A dependency removed from pyproject.toml leaves the lock too."""
    direct = {name for name, (_, _, via) in locked(lock).items() if FROM_PYPROJECT in via}
    asked = {canonicalize_name(r.name) for r in requirements()}  # type: ignore[operator]
    assert direct == asked, STALE


def test_the_image_runs_exactly_the_versions_the_tests_ran() -> None:
    development = locked(DEV_LOCK)
    for name, (version, hashes, _) in locked(LOCK).items():
        assert development[name][:2] == (version, hashes), name


def test_every_locked_package_has_a_hash() -> None:
    for lock in (LOCK, DEV_LOCK):
        unhashed = [name for name, (_, hashes, _) in locked(lock).items() if not hashes]
        assert unhashed == [], lock.name


def test_the_build_requirements_file_names_what_pyproject_builds_with() -> None:
    listed = [
        Requirement(line)
        for line in BUILD_REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert [str(r) for r in listed] == [str(r) for r in build_requirements()]
