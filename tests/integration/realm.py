"""A throwaway Kerberos realm (MIT krb5kdc through k5test) for tests that start processes."""

from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path
from typing import Any

GSSAPI_INSTALL = "pip install '.[kerberos]' (needs libkrb5-dev, cc)"


def missing_kerberos_tool() -> str | None:
    """Say which tool a Kerberos test lacks here, or None when all are at hand."""
    for module, why in [
        ("gssapi", f"GSSAPI (python-gssapi) is not installed: {GSSAPI_INSTALL}"),
        ("krb5", f"python-krb5 is not installed: {GSSAPI_INSTALL}"),
        ("k5test", "k5test (the dev extra) is not installed"),
    ]:
        if importlib.util.find_spec(module) is None:
            return why
    if shutil.which("krb5kdc") is None and not Path("/usr/sbin/krb5kdc").exists():
        return "krb5kdc (Debian krb5-kdc) is not installed"
    return None


class ThrowawayRealm:
    """A running KDC with one service principal (its keys in a keytab) and one account."""

    def __init__(self, tmp: Path, *, realm: str, service: str, account: str, password: str) -> None:
        import k5test  # noqa: PLC0415 - optional: the dev extra

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.k5: Any = k5test.K5Realm(
            realm=realm,
            portbase=port,
            create_host=False,
            get_creds=False,
            krb5_conf={"libdefaults": {"rdns": "false", "dns_canonicalize_hostname": "false"}},
        )
        self.service_keytab = str(tmp / "service.keytab")
        self.k5.addprinc(f"{service}@{realm}")
        self.k5.extract_keytab(f"{service}@{realm}", self.service_keytab)
        self.k5.addprinc(account, password)

    def environ(self, tmp: Path) -> dict[str, str]:
        """What a process needs to use the realm: its configuration and a cache of its own."""
        return {
            "KRB5_CONFIG": self.k5.env["KRB5_CONFIG"],
            "KRB5CCNAME": f"FILE:{tmp / 'ccache'}",
            "KRB5RCACHEDIR": str(tmp),
        }

    def stop(self) -> None:
        self.k5.stop()
        shutil.rmtree(self.k5.tmpdir, ignore_errors=True)
