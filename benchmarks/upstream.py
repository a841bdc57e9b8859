"""The upstreams the gateway and the baseline call: a static nginx, or the EWS simulator."""

from __future__ import annotations

from pathlib import Path

from benchmarks.processes import Service, free_port, installed, python_command, start_service

EWS_PATH = "/EWS/Exchange.asmx"
SOAP_CONTENT_TYPE = "text/xml; charset=utf-8"

# What Exchange 2010 answers to a successful DisconnectPhoneCall, on one line so that
# nginx can hold it in a `return` string (it holds no single quote).
DISCONNECT_SUCCESS = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header>'
    '<h:ServerVersionInfo MajorVersion="14" MinorVersion="3" MajorBuildNumber="123" '
    'MinorBuildNumber="3" xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types" '
    'xmlns="http://schemas.microsoft.com/exchange/services/2006/types" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/></s:Header>'
    '<s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
    '<m:DisconnectPhoneCallResponse ResponseClass="Success" '
    'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
    'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">'
    "<m:ResponseCode>NoError</m:ResponseCode></m:DisconnectPhoneCallResponse></s:Body>"
    "</s:Envelope>"
)

# What a client sends for DisconnectPhoneCall: the body of the "upstream direct" runs
# (a template: call ids are printable ASCII and the caller escapes them).
DISCONNECT_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types" '
    'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">'
    '<soap:Header><t:RequestServerVersion Version="Exchange2010"/></soap:Header>'
    '<soap:Body><m:DisconnectPhoneCall><m:PhoneCallId Id="{call_id}"/>'
    "</m:DisconnectPhoneCall></soap:Body></soap:Envelope>"
)

# nginx answers POST to a static file with 405, hence `return`. Keep-alive is as long
# as the gateway's pool may hold a connection, and never cut after N requests.
NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = {ews_path} {{
            default_type text/xml;
            charset utf-8;
            return 200 '{envelope}';
        }}
        location = /health {{
            default_type text/plain;
            return 200 'ok';
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """Return nginx's path, also where /usr/sbin is not on PATH."""
    return installed("nginx", "/usr/sbin/nginx")


def start_nginx(workdir: Path) -> Service:
    """Serve the canned DisconnectPhoneCall answer from nginx on a free loopback port."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=prefix, port=port, ews_path=EWS_PATH, envelope=DISCONNECT_SUCCESS)
    )
    command = [binary, "-p", str(prefix), "-e", str(prefix / "nginx-error.log"), "-c", str(conf)]
    url = f"http://127.0.0.1:{port}"
    return start_service("nginx", command, url=url, ready_path="/health", log_path=prefix / "log")


def start_simulator(workdir: Path, latency_ms: int) -> Service:
    """Run the gateway's EWS simulator, every answer delayed by LATENCY_MS."""
    port = free_port()
    command = python_command(
        "-m", "gateway", "simulator", "--bind", f"127.0.0.1:{port}", "--latency-ms", str(latency_ms)
    )
    return start_service(
        f"simulator ({latency_ms} ms)",
        command,
        url=f"http://127.0.0.1:{port}",
        ready_path="/simulator/health",
        log_path=workdir / f"simulator-{port}.log",
    )
