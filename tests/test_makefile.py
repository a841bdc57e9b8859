"""The Makefile: targets started at once in a fresh clone build one environment, once."""

from __future__ import annotations

import shutil
import subprocess
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
echo "pip $*" >> "$here/pip.log"
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


@pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("flock") is None,
    reason="needs make and flock (util-linux)",
)
def test_make_demo_and_make_unit_at_once_in_a_fresh_clone_install_one_environment_once(
    tmp_path: Path,
) -> None:
    for name in ("Makefile", "pyproject.toml", "requirements-dev.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)

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
