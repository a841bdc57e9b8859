"""Scratch folders of npm packages for tests that drive real JavaScript against the gateway."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

NPM_TIMEOUT_S = 300


def npm_scratch(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    packages: Sequence[str],
    scripts: Iterable[Path] = (),
) -> Path:
    """Install PACKAGES (pinned `name@version`) from npm into a fresh folder beside SCRIPTS.

    Skips, naming the tool, where node or npm is missing (Debian: nodejs, npm).
    """
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: nodejs, npm)")
    folder = tmp_path_factory.mktemp(name)
    (folder / "package.json").write_text(f'{{"name": "{name}", "private": true}}\n')
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--no-save", *packages],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for script in scripts:
        shutil.copy(script, folder)
    return folder
