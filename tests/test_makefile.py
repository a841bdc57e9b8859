"""The Makefile: targets started at once in a fresh clone build one environment, once, and
each says what it does and costs before it does it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Stands in for python3: `-m venv DIR` makes a DIR whose pip records each install and fails
# if another is under way in the same environment; everything else is the real python3.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cat > "$3/bin/pip" <<'PIP'
#!/bin/sh
here="$(dirname "$0")/.."
if ! mkdir "$here/installing" 2>/dev/null; then echo overlap >> "$here/pip.log"; exit 1; fi
echo "${PYTHONWARNINGS:+PYTHONWARNINGS=$PYTHONWARNINGS }pip $*" >> "$here/pip.log"
sleep 0.5
rmdir "$here/installing"
PIP
  for tool in pip pytest ruff mypy ews-gateway python; do
    [ "$tool" = pip ] || printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/$tool"
    chmod +x "$3/bin/$tool"
  done
  exit 0
fi
exec python3 "$@"
"""


needs_make = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("flock") is None,
    reason="needs make and flock (util-linux)",
)


def fresh_clone(directory: Path) -> Path:
    """Copy what the Makefile reads into DIRECTORY; return the fake python3 beside it."""
    for name in ("Makefile", "pyproject.toml", "requirements-dev.lock"):
        shutil.copy(ROOT / name, directory / name)
    fake_python = directory / "fake-python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    return fake_python


def make(directory: Path, target: str, **variables: str) -> str:
    """Run make TARGET in DIRECTORY with the fake python3; return what it printed."""
    fake_python = directory / "fake-python"
    result = subprocess.run(
        ["make", "--no-print-directory", f"PYTHON={fake_python}", target],
        cwd=directory,
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@needs_make
def test_make_demo_and_make_unit_at_once_in_a_fresh_clone_install_one_environment_once(
    tmp_path: Path,
) -> None:
    fake_python = fresh_clone(tmp_path)

    makes = [
        subprocess.Popen(
            ["make", "--no-print-directory", f"PYTHON={fake_python}", target],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for target in ("demo", "unit")
    ]
    outputs = [make.communicate(timeout=60)[0] for make in makes]

    assert [make.returncode for make in makes] == [0, 0], outputs
    installs = (tmp_path / ".venv" / "pip.log").read_text().splitlines()
    assert "overlap" not in installs
    assert installs  # the environment was built...
    assert len(installs) == len(set(installs))  # ...and each install ran once, not twice
    assert len(list((tmp_path / ".venv").glob(".installed-*"))) == 1


@needs_make
def test_make_demo_says_first_that_it_builds_the_environment_without_echoing_its_recipe(
    tmp_path: Path,
) -> None:
    fresh_clone(tmp_path)

    first = make(tmp_path, "demo")
    again = make(tmp_path, "demo")

    assert first.splitlines() == [
        "Building the environment in .venv (about 3 minutes; pip shows its progress)",
        "The environment in .venv is ready.",
    ]
    assert again == ""
    installs = (tmp_path / ".venv" / "pip.log").read_text().splitlines()
    # pip shows its progress on the locked packages; setuptools' warnings on the editable
    # installs are silenced.
    assert "--quiet" not in installs[0]
    assert all(line.startswith("PYTHONWARNINGS=ignore pip") for line in installs[1:])


@needs_make
@pytest.mark.parametrize("schema", [True, False], ids=["schema found", "no schema"])
def test_make_test_says_first_how_long_it_takes_and_where_the_schema_comes_from(
    tmp_path: Path, schema: bool
) -> None:
    fresh_clone(tmp_path)
    schema_dir = tmp_path / "schema"
    schema_dir.mkdir()
    if schema:
        (schema_dir / "messages.xsd").write_text("<schema/>")

    output = make(tmp_path, "test", EWS_SCHEMA_DIR=str(schema_dir)).splitlines()

    found = "found" if schema else "not found: they will skip"
    assert output[:4] == [
        "make test: lint, then every test (unit and integration) with coverage: "
        "about 10 minutes on 2 cores.",
        f"The EWS schema tests need the schema in EWS_SCHEMA_DIR (now {schema_dir}, {found}):",
        "messages.xsd and types.xsd, which any Exchange serves at /EWS/messages.xsd and "
        "/EWS/types.xsd,",
        "and xml.xsd, the XML namespace schema (https://www.w3.org/2001/xml.xsd).",
    ]


def test_the_schema_tests_read_ews_schema_dir_and_their_skip_reason_names_it(
    tmp_path: Path,
) -> None:
    probe = (
        "from tests.ews_schema import SCHEMA_DIR, SKIP_REASON, schema_available; "
        "print(SCHEMA_DIR); print(schema_available()); print(SKIP_REASON)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "EWS_SCHEMA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    folder, available, reason = result.stdout.splitlines()
    assert (folder, available) == (str(tmp_path), "False")
    assert reason.startswith(f"EWS schema not found in {tmp_path}: set EWS_SCHEMA_DIR")
    assert "/EWS/messages.xsd" in reason
    assert "/EWS/types.xsd" in reason
