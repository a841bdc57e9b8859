"""Audit the locked dependencies for known vulnerabilities: any finding fails.

    .venv/bin/python .ci/audit.py requirements-dev.lock

pip-audit reads each pinned version's advisories from PyPI. A finding, or a
package that could not be audited while others could, exits 1. When no
package at all could be audited (the machine cannot reach PyPI's advisory
data), it says so loudly and exits 0, unless AUDIT_REQUIRED=1. To accept a
finding on purpose, pass `--ignore-vuln ID` after the lock file, with a
comment in .ci/run saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main() -> int:
    lock, *extra = sys.argv[1:]
    command = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    command += ["--disable-pip", "--require-hashes", "-r", lock, *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"audit: pip-audit failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    packages = report["dependencies"]
    vulnerable = [package for package in packages if package.get("vulns")]
    skipped = [package for package in packages if "skip_reason" in package]
    for package in vulnerable:
        for vuln in package["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions", [])) or "none yet"
            print(f"audit: {package['name']} {package['version']}: {vuln['id']} (fixed in {fixed})")
    if vulnerable:
        return 1
    if packages and len(skipped) == len(packages) and os.environ.get("AUDIT_REQUIRED") != "1":
        print(
            f"audit: NOT RUN: none of the {len(packages)} locked packages could be looked up "
            "(PyPI's advisory data is unreachable from this machine)",
            file=sys.stderr,
        )
        return 0
    for package in skipped:
        print(f"audit: {package['name']} not audited: {package['skip_reason']}", file=sys.stderr)
    if skipped:
        return 1
    print(f"audit: {len(packages)} locked packages, no known vulnerability")
    return 0


if __name__ == "__main__":
    sys.exit(main())
