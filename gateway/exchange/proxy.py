"""The outbound proxy to Exchange: which one, if any, as curl chooses it.

curl's rules (libcurl's CURLOPT_PROXY and CURLOPT_NOPROXY, and its
environment variables): `https_proxy` / `HTTPS_PROXY` for https URLs,
`http_proxy` for http URLs (only the lower-case name, since `HTTP_PROXY` can
be set by a CGI request's `Proxy:` header; the upper-case one is read here
too, as most clients do, because the gateway is no CGI program), `all_proxy`
/ `ALL_PROXY` for either; the lower-case variant wins. `no_proxy` /
`NO_PROXY` is a comma-separated list: `*` matches every host; a name matches
itself and its subdomains (a leading dot is ignored); an IP address or a CIDR
range matches addresses, given literally in EWS_URL. Names are compared
without case and without a trailing dot, as IDNA 2008 A-labels. A proxy URL without a scheme is
http://, and one without a port is port 1080, as for curl; credentials in it
become Proxy-Authorization. Its host is named by IDNA 2008 A-labels, and one
DNS cannot carry (an empty label, one over 63 characters) is refused at start.
gateway.config reads the variables; this module applies the rules to their
values.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from gateway.exchange import http1

# curl's port for a proxy URL that names none.
CURL_DEFAULT_PROXY_PORT = 1080


@dataclass(frozen=True)
class Proxy:
    """A forward proxy: its address and the Proxy-Authorization value its URL carried."""

    host: str
    port: int
    # Never logged or shown in a repr: it is a credential.
    authorization: str | None = field(default=None, repr=False)
    # The environment variable that named it (HTTPS_PROXY, http_proxy, ...), for messages.
    variable: str = field(default="", compare=False)

    @property
    def address(self) -> str:
        """host:port without credentials, safe to log."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def proxy_for(url: str, proxy_url: str, variable: str, no_proxy: str) -> Proxy | None:
    """Return the proxy for requests to url (None: connect directly).

    proxy_url is the value of the variable curl would read for url's scheme (empty
    when none is set); no_proxy is NO_PROXY's list. Raises ValueError, naming the
    variable, when the proxy URL cannot be used.
    """
    if not proxy_url:
        return None
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if bypasses_proxy(no_proxy, host):
        return None
    return parse_proxy_url(proxy_url, variable)


def parse_proxy_url(value: str, name: str) -> Proxy:
    """Read a proxy URL such as http://user:secret@proxy.example.com:3128."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    try:
        port = parts.port or CURL_DEFAULT_PROXY_PORT
    except ValueError:
        raise ValueError(f"{name} has a port outside 1-65535") from None
    if parts.scheme != "http":
        raise ValueError(f"{name} must be an http:// proxy (CONNECT is used for https)")
    if not parts.hostname or port == 0:
        raise ValueError(f"{name} must name a proxy host and a port from 1 to 65535")
    try:
        # As DNS names it (IDNA 2008), not as the resolver's own IDNA 2003 codec would.
        host = http1.ascii_host(parts.hostname)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return Proxy(host, port, authorization, name)


def bypasses_proxy(no_proxy: str, host: str) -> bool:
    """Tell whether NO_PROXY's list exempts this host (lower case, no trailing dot).

    Names are compared as IDNA 2008 A-labels, so `bücher.example` and `xn--bcher-kva.example`
    are one domain whichever form EWS_URL and NO_PROXY use.
    """
    host = _a_labels(host)
    address = _address(host)
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            if _address_matches(entry, address):
                return True
            continue
        name = _a_labels(entry.lstrip(".").rstrip("."))
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _a_labels(name: str) -> str:
    """NAME as lower-case A-labels; as it is if IDNA 2008 refuses it (then it matches only
    itself)."""
    try:
        return http1.ascii_host(name).lower()
    except ValueError:
        return name


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _address_matches(entry: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        network = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network
