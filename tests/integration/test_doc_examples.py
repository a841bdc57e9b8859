"""The shell blocks of the README and docs/, run as written against real processes.

Each block's comment (tests/doc_blocks.py) names how it runs:

- demo: against `ews-gateway demo`. In a block of `$ command` lines each command's output must
  be what the block shows: the status line, every header shown (X-Request-ID only present;
  Location naming the call just placed) and the JSON body, where "..." stands for the rest of
  a string. Any other block is a script whose requests must all succeed.
- recipe-setup, recipe, recipe-call: in a scratch folder, the setup block, then the recipe,
  against a simulator asking for the credentials the recipe sends (Basic, NTLM, or Kerberos
  from a throwaway realm), up to `ews-gateway serve` answering; then the first recipe-call
  block after the recipe in its document places a call through it. A recipe that sets no
  EWS_URL changes the README's first recipe: its `export` lines run first.
- production: two replicas of the README's first recipe with the production block, Redis,
  and the README's nginx snippet in front; its Prometheus configuration must pass promtool.

What a test changes in a block, and nothing else: the example hosts and ports become the
loopback ones the processes listen on, `.venv/bin/` the environment the tests run in, and
`/etc/...` files the test's own. What a reader supplies by hand (the service account's
password in secrets/, a keytab copied from the domain controller) the test writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509

from tests.certificates import self_signed_certificate
from tests.doc_blocks import README, ROOT, Block, marked
from tests.integration.processes import Server, free_port, http, start, wait_until

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")

BIN = f"{Path(sys.executable).parent}/"
EXCHANGE = "https://mail.corp.example.com"
PASSWORD = "Service-Passw0rd-1"  # what the reader puts in secrets/ews-password
REDIS_PASSWORD = "Redis-Passw0rd-1"
PLACED = "HTTP/1.1 201"


def block_id(block: Block) -> str:
    return str(block)


# --- demo ----------------------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    """`ews-gateway demo` on free ports; yields it and its simulator's port."""
    gateway_port, simulator_port = free_port(), free_port()
    binds = [
        "--bind",
        f"127.0.0.1:{gateway_port}",
        "--simulator-bind",
        f"127.0.0.1:{simulator_port}",
    ]
    server = start(
        ["demo", *binds],
        {},
        f"http://127.0.0.1:{gateway_port}",
        "/readyz",
        tmp_path / "demo.log",
    )
    yield server, simulator_port
    server.stop()


def session(text: str) -> list[tuple[str, str]]:
    """Split a `$ command` block into (command, output it shows); continued lines joined."""
    pairs: list[tuple[str, str]] = []
    for part in text.split("\n$ "):
        lines = part.removeprefix("$ ").split("\n")
        command = lines.pop(0)
        while command.endswith("\\"):
            command = command[:-1] + lines.pop(0)
        pairs.append((command, "\n".join(lines).strip()))
    return pairs


def matches(shown: object, real: object) -> bool:
    """Whether REAL is what SHOWN shows: equal, with "..." standing for the rest of a string."""
    if isinstance(shown, str) and shown.endswith("..."):
        return isinstance(real, str) and real.startswith(shown.removesuffix("..."))
    if isinstance(shown, dict) and isinstance(real, dict):
        return shown.keys() == real.keys() and all(matches(shown[k], real[k]) for k in shown)
    return shown == real


def check_answer(command: str, shown: str, real: str, call_id: str) -> None:
    """The status, headers and JSON body shown are what curl printed."""
    shown_head, _, shown_body = shown.partition("\n\n")
    if shown.startswith("HTTP/"):
        real_head, _, real_body = real.partition("\n\n")  # text mode turned CRLF into LF
        shown_lines = shown_head.splitlines()
        assert real_head.splitlines()[0] == shown_lines[0], f"{command}:\n{real}"
        real_headers = dict(line.split(": ", 1) for line in real_head.splitlines()[1:])
        for line in shown_lines[1:]:
            name, value = line.split(": ", 1)
            assert name in real_headers, f"{command}: no {name}"
            if name == "Location":
                assert real_headers[name] == f"/calls/{call_id}", command
            elif name != "X-Request-ID":
                assert real_headers[name] == value, f"{command}: {name}"
    else:
        shown_body, real_body = shown, real
    if shown_body:
        expected = json.loads(shown_body.replace("\n", ""))
        if "callId" in expected:
            expected["callId"] = "..."
        assert matches(expected, json.loads(real_body)), f"{command}:\n{real_body}"


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        events.append(dict(line.split(": ", 1) for line in block.splitlines() if ": " in line))
    return events


def check_stream(command: str, script: str, shown: str, gateway: Server, call_id: str) -> None:
    """Watch the stream; a watched call is hung up once Connected, so the stream ends."""
    script = script.replace("curl -N", "curl -N --max-time 30")  # a stream that never ends
    env = {**os.environ, "CALL": call_id}
    with subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True
    ) as watcher:
        assert watcher.stdout is not None
        real = ""
        if "$CALL" in command:
            while '"state":"Connected"' not in real:
                line = watcher.stdout.readline()
                assert line, f"the stream ended before Connected:\n{real}"
                real += line
            assert http("DELETE", f"{gateway.url}/calls/{call_id}").status == 200
        real += watcher.stdout.read()
    assert watcher.returncode == 0, real
    expected, received = sse_events(shown), sse_events(real)
    assert [e.keys() for e in received] == [e.keys() for e in expected], real
    for want, got in zip(expected, received, strict=True):
        assert got.get("id") == want.get("id"), real  # the id names the state itself
        assert got["event"] == want["event"], real
        shown_data = json.loads(want["data"].replace(",...}", "}"))
        real_data = json.loads(got["data"])
        if want["data"].endswith(",...}"):  # the block shows the problem's first fields
            real_data = {key: real_data[key] for key in shown_data}
        assert matches(shown_data, real_data), real


def place_demo_call(gateway: Server) -> str:
    body = {"itemId": "AAMkADemoVoiceMail", "dialString": "+15551234567"}
    call_id: str = http("POST", f"{gateway.url}/calls", body).json()["callId"]
    return call_id


def run_session(text: str, gateway: Server) -> None:
    call_id = ""
    for command, shown in session(text):
        if command.startswith("CALL="):
            continue  # the test keeps the id itself
        if "$CALL" in command and not call_id:
            call_id = place_demo_call(gateway)
        if "seconds later" in command:
            time.sleep(2.5)  # the simulator's call: Connecting, Alerted, then Connected
        if command.startswith("curl -N"):
            check_stream(command, command, shown, gateway, call_id)
            continue
        result = subprocess.run(
            ["bash", "-c", command],
            env={**os.environ, "CALL": call_id},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        if result.stdout.startswith(PLACED):
            call_id = json.loads(result.stdout.split("\n\n", 1)[1])["callId"]
        check_answer(command, shown, result.stdout, call_id)


@pytest.mark.parametrize("block", marked("demo"), ids=block_id)
def test_a_demo_example_answers_as_shown(block: Block, demo: tuple[Server, int]) -> None:
    gateway, simulator_port = demo
    gateway_port = gateway.url.rsplit(":", 1)[1]

    def localized(text: str) -> str:
        return text.replace("localhost:8080", f"127.0.0.1:{gateway_port}").replace(
            "localhost:8081", f"127.0.0.1:{simulator_port}"
        )

    if block.text.startswith("$ "):
        run_session(localized(block.text), gateway)
        return
    # A script: every request it sends must succeed.
    script = 'curl() { command curl --fail-with-body "$@"; }\n' + localized(block.text)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- recipes -------------------------------------------------------------------------------


@cache
def check_available() -> bool:
    """Whether this build has `ews-gateway check`."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--help"], capture_output=True, check=False
    )
    return result.returncode == 0


def recipe_setup() -> str:
    return marked("recipe-setup")[0].text


def first_recipe() -> Block:
    return next(block for block in marked("recipe") if block.document == README)


def exports(block: Block) -> str:
    return "".join(line + "\n" for line in block.text.splitlines() if line.startswith("export "))


def setting(script: str, name: str) -> str:
    """The value SCRIPT gives NAME in an `export` line, unquoted."""
    values: list[str] = re.findall(rf"\b{name}=('[^']*'|\S+)", script)
    assert values, f"no {name} in the recipe"
    return values[-1].strip("'")


def call_after(recipe: Block) -> Block:
    """The first recipe-call block after RECIPE in its document."""
    return next(
        block
        for block in marked("recipe-call")
        if block.document == recipe.document and block.line > recipe.line
    )


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the gateway's variables: a reader's fresh shell."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("EWS_", "GATEWAY_"))}
    return {**kept, **extra}


def localize(script: str, exchange_url: str) -> str:
    script = script.replace(EXCHANGE, exchange_url).replace(".venv/bin/", BIN)
    if not check_available():
        script = re.sub(rf"^{re.escape(BIN)}ews-gateway check\n", "", script, flags=re.M)
    return script


@contextmanager
def simulator_asking(auth: str, script: str, folder: Path, logs: Path) -> Iterator[dict[str, str]]:
    """A simulator that takes the credentials SCRIPT gives; yields EWS_URL's replacement and
    the environment the gateway needs besides (a Kerberos realm's configuration)."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", "0.2"]
    env: dict[str, str] = {}
    with ExitStack() as stack:
        username = setting(script, "EWS_USERNAME")
        if auth == "basic":
            accounts = logs / "accounts"
            accounts.write_text(f"{username}:{PASSWORD}\n", encoding="utf-8")
            args += ["--auth", "basic", "--accounts", str(accounts)]
        elif auth == "ntlm":
            domain, _, user = username.partition("\\")
            (logs / "ntlm-users").write_text(f"{domain}:{user}:{PASSWORD}\n", encoding="utf-8")
            env["NTLM_USER_FILE"] = str(logs / "ntlm-users")
            args += ["--auth", "ntlm"]
        else:
            realm = stack.enter_context(kerberos_realm(script, folder, logs))
            env.update(realm)
            args += ["--auth", "kerberos", "--keytab", str(logs / "http.keytab")]
        simulator = start(
            args, env, f"http://127.0.0.1:{port}", "/simulator/health", logs / "simulator.log"
        )
        stack.callback(simulator.stop)
        env.pop("NTLM_USER_FILE", None)
        yield {"url": simulator.url, **env}


@contextmanager
def kerberos_realm(script: str, folder: Path, logs: Path) -> Iterator[dict[str, str]]:
    """A throwaway KDC for the recipe's principals: the gateway's keytab where the recipe
    reads it, Exchange's service keys in logs/http.keytab."""
    k5test = pytest.importorskip("k5test", reason="k5test (the dev extra) is not installed")
    pytest.importorskip("gssapi", reason="GSSAPI is not installed: the kerberos extra")
    if shutil.which("krb5kdc") is None and not Path("/usr/sbin/krb5kdc").exists():
        pytest.skip("krb5kdc (Debian krb5-kdc) is not installed")
    account = setting(script, "EWS_USERNAME")
    realm_name = account.partition("@")[2]
    realm = k5test.K5Realm(
        realm=realm_name,
        portbase=free_port(),
        create_host=False,
        get_creds=False,
        krb5_conf={"libdefaults": {"rdns": "false", "dns_canonicalize_hostname": "false"}},
    )
    try:
        service = f"{setting(script, 'EWS_SPN')}@{realm_name}"
        realm.addprinc(service)
        realm.extract_keytab(service, str(logs / "http.keytab"))
        realm.addprinc(account)
        keytab = folder / setting(script, "EWS_KEYTAB")
        keytab.parent.mkdir(mode=0o700, exist_ok=True)
        realm.extract_keytab(account, str(keytab))
        yield {
            "KRB5_CONFIG": realm.env["KRB5_CONFIG"],
            "KRB5CCNAME": f"FILE:{logs / 'ccache'}",
            "KRB5RCACHEDIR": str(logs),
        }
    finally:
        realm.stop()
        shutil.rmtree(realm.tmpdir, ignore_errors=True)


@contextmanager
def shell(script: str, folder: Path, env: dict[str, str], log: Path) -> Iterator[Path]:
    """Run SCRIPT as a reader's shell in FOLDER until the block ends; yields its log."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-eu", "-c", script],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_serving(url: str, log: Path) -> None:
    def serving() -> bool:
        try:
            return http("GET", f"{url}/readyz", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(serving, f"the gateway at {url}", timeout_s=30)
    except AssertionError:
        raise AssertionError(log.read_text(errors="replace")) from None


def prepare(folder: Path) -> str:
    """Run the recipe's setup in FOLDER as a reader would; return the API key it made."""
    folder.mkdir(exist_ok=True)
    script = recipe_setup() + 'printf %s "$key" > .api-key-for-the-test\n'
    subprocess.run(["bash", "-eu", "-c", script], cwd=folder, check=True, env=clean_environment())
    (folder / "secrets" / "ews-password").write_text(PASSWORD + "\n", encoding="utf-8")
    return (folder / ".api-key-for-the-test").read_text(encoding="utf-8")


def run_call(block: Block, folder: Path, port: int, key: str) -> str:
    script = block.text.replace("localhost:8080", f"127.0.0.1:{port}").replace(".venv/bin/", BIN)
    result = subprocess.run(
        ["bash", "-eu", "-c", script],
        cwd=folder,
        env=clean_environment(key=key),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("recipe", marked("recipe"), ids=block_id)
def test_a_recipe_checks_exchange_serves_and_takes_a_call(recipe: Block, tmp_path: Path) -> None:
    folder, logs = tmp_path / "here", tmp_path / "logs"
    logs.mkdir()
    key = prepare(folder)
    base = "" if "export EWS_URL=" in recipe.text else exports(first_recipe())
    written = base + recipe.text
    port = free_port()
    with simulator_asking(setting(written, "EWS_AUTH"), written, folder, logs) as exchange:
        env = clean_environment(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_WORKERS="1")
        env.update({k: v for k, v in exchange.items() if k != "url"})
        script = localize(written, exchange["url"])
        with shell(script, folder, env, logs / "recipe.log") as log:
            wait_until_serving(f"http://127.0.0.1:{port}", log)
            answer = run_call(call_after(recipe), folder, port, key)
    assert answer.startswith(PLACED), answer
    if not check_available():
        pytest.skip("ews-gateway check is not in this build: the recipe ran without it")


# --- production ----------------------------------------------------------------------------


def installed(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


NGINX_AROUND = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/client-body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{snippet}
}}
"""


def production_block(language: str) -> Block:
    return next(block for block in marked("production") if block.language == language)


def on_loopback(text: str, first: int, second: int) -> str:
    text = text.replace("gw1.corp.example.com:8080", f"127.0.0.1:{first}")
    return text.replace("gw2.corp.example.com:8080", f"127.0.0.1:{second}")


@contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        running = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield running
    finally:
        running.terminate()
        running.wait(timeout=30)


def through(balancer: str, *curl: str) -> str:
    result = subprocess.run(
        ["curl", "-sik", *curl[:-1], f"{balancer}{curl[-1]}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(installed("redis-server") is None, reason="redis-server is not installed")
@pytest.mark.skipif(installed("nginx") is None, reason="nginx is not installed")
@pytest.mark.skipif(installed("promtool") is None, reason="promtool is not installed")
def test_the_production_example_shares_calls_and_quotas_behind_nginx(tmp_path: Path) -> None:
    folder, logs = tmp_path / "here", tmp_path / "logs"
    logs.mkdir()
    key = prepare(folder)
    (folder / "secrets" / "redis-password").write_text(REDIS_PASSWORD + "\n", encoding="utf-8")
    replica = exports(first_recipe()) + production_block("sh").text
    redis_port, first, second, balancer_port = (free_port() for _ in range(4))
    with ExitStack() as stack:
        redis = [str(installed("redis-server")), "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis += ["--requirepass", REDIS_PASSWORD, "--save", "", "--dir", str(logs)]
        stack.enter_context(process(redis, logs / "redis.log"))
        exchange = stack.enter_context(simulator_asking("basic", replica, folder, logs))
        script = localize(replica, exchange["url"]).replace(
            "redis://redis.corp.example.com:6379", f"redis://127.0.0.1:{redis_port}"
        )
        for name, port in (("gw1", first), ("gw2", second)):
            env = clean_environment(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_WORKERS="1")
            log = stack.enter_context(shell(script, folder, env, logs / f"{name}.log"))
            wait_until_serving(f"http://127.0.0.1:{port}", log)

        certificate = self_signed_certificate(logs, [x509.DNSName("localhost")])
        snippet = on_loopback(production_block("nginx").text, first, second)
        snippet = snippet.replace("listen 443 ssl", f"listen 127.0.0.1:{balancer_port} ssl")
        snippet = snippet.replace("/etc/nginx/tls/gateway.crt", str(certificate.cert_path))
        snippet = snippet.replace("/etc/nginx/tls/gateway.key", str(certificate.key_path))
        (logs / "nginx.conf").write_text(NGINX_AROUND.format(tmp=logs, snippet=snippet))
        nginx = [str(installed("nginx")), "-p", str(logs), "-c", str(logs / "nginx.conf")]
        nginx += ["-e", str(logs / "nginx-error.log"), "-g", "daemon off;"]
        stack.enter_context(process(nginx, logs / "nginx.log"))
        balancer = f"https://127.0.0.1:{balancer_port}"
        wait_until(lambda: https_ready(f"{balancer}/readyz"), "nginx")

        place = ["-X", "POST", "-H", f"X-API-Key: {key}", "-H", "Content-Type: application/json"]
        place += ["-d", '{"itemId": "AAMk...", "dialString": "4711"}', "/calls"]
        placed = [through(balancer, *place) for _ in range(2)]
        call_id = json.loads(placed[0].split("\n\n", 1)[1])["callId"]
        read = [through(balancer, "-H", f"X-API-Key: {key}", f"/calls/{call_id}") for _ in "12"]

    assert all(answer.startswith(PLACED) for answer in placed), placed
    # One quota for both replicas, counted in Redis: the second call is the second unit spent.
    assert 'RateLimit: "calls";r=8' in placed[1], placed[1]
    # Both replicas know the call: the same call id key signs it.
    assert all(answer.startswith("HTTP/1.1 200") for answer in read), read
    prometheus = on_loopback(production_block("yaml").text, first, second)
    prometheus = prometheus.replace("/etc/prometheus/", f"{ROOT}/deploy/prometheus/")
    (logs / "prometheus.yml").write_text(prometheus)
    checked = subprocess.run(
        [str(installed("promtool")), "check", "config", str(logs / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    if not check_available():
        pytest.skip("ews-gateway check is not in this build: the replicas started without it")


def https_ready(url: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
