"""The `ews-gateway` command: serve, check, demo and simulator."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace

from gateway.app import build_check
from gateway.config import Config, check_bind, variables_help
from gateway.errors import ConfigError
from gateway.exchange.check import StepResult
from gateway.serving.server import ensure_can_listen, serve
from gateway.simulator import serve_forever
from gateway.simulator.acceptor import AUTH_MODES, acceptor_for
from gateway.simulator.idle import IDLE_ACTIONS, InvalidIdlePolicy, idle_policy
from gateway.simulator.server import TlsIdentity
from gateway.telemetry.logs import LogLevels, configure_logging

DEMO_BIND = "127.0.0.1:8080"
SIMULATOR_BIND = "127.0.0.1:8081"
SIMULATOR_START_TIMEOUT_S = 10.0
# The simulator dials nobody, so the demo lets every dial string through (and says so).
DEMO_DIAL_ALLOW = "*"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(f"ews-gateway: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ews-gateway", description="JSON/HTTP gateway to Exchange Unified Messaging calls."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gateway in production (gunicorn)",
        description="Run the gateway under gunicorn, configured by the environment.",
        epilog=variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(run=_serve)
    check = commands.add_parser(
        "check",
        help="try the configured way to Exchange once, step by step, and exit",
        description="With serve's configuration, resolve and connect to EWS_URL (through the "
        "proxy if one is set), complete TLS, see which authentication schemes Exchange "
        "offers, authenticate, and send one harmless EWS request (GetPhoneCallInformation "
        "for a call that cannot exist). Each step prints one line: ok, or FAIL and what to "
        "change. Exit status: 0 when every step passed, 1 when one failed, 2 for a "
        "configuration error. Each request is bounded by EWS_TIMEOUT_SECONDS; no secret is "
        "printed.",
        epilog=variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.set_defaults(run=_check)
    demo = commands.add_parser(
        "demo",
        help="run the gateway against the built-in EWS simulator",
        description="Run the gateway (caller authentication off) against the built-in EWS "
        "simulator, both on loopback: no Exchange server is involved and no phone rings.",
    )
    demo.add_argument(
        "--bind",
        type=_listen_address("--bind"),
        default=None,
        metavar="HOST:PORT",
        help=f"where the gateway listens (default: GATEWAY_BIND, else {DEMO_BIND})",
    )
    demo.add_argument(
        "--simulator-bind",
        type=_listen_address("--simulator-bind"),
        default=None,
        metavar="HOST:PORT",
        help="where the EWS simulator listens: its EWS endpoint and its control API "
        "(/simulator/faults, /simulator/requests, /simulator/calls); default: a free "
        "loopback port",
    )
    demo.set_defaults(run=_demo)
    simulator = commands.add_parser(
        "simulator",
        help="run the EWS simulator alone",
        description="Run the built-in EWS simulator: an Exchange that places no real calls. "
        "Its EWS endpoint is /EWS/Exchange.asmx, its WSDL /EWS/Services.wsdl; its control "
        "API (/simulator/faults to "
        "inject Exchange's failures, /simulator/calls, /simulator/requests) is listed at "
        "/simulator/. docs/simulator.md lists the fault kinds.",
    )
    simulator.add_argument(
        "--bind",
        type=_listen_address("--bind"),
        default=SIMULATOR_BIND,
        metavar="HOST:PORT",
        help="where the simulator listens (default %(default)s)",
    )
    simulator.add_argument(
        "--latency-ms",
        type=int,
        default=0,
        metavar="MS",
        help="answer every EWS request MS milliseconds after it arrived (default %(default)s)",
    )
    simulator.add_argument(
        "--step-seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between a call's state changes (default %(default)s)",
    )
    simulator.add_argument(
        "--schema-dir",
        default=None,
        metavar="DIR",
        help="validate requests against the EWS schema in this folder (messages.xsd, "
        "types.xsd, xml.xsd) and serve its messages.xsd and types.xsd under /EWS/",
    )
    simulator.add_argument(
        "--mailbox-servers",
        type=int,
        default=1,
        metavar="N",
        help="mailbox servers behind one front end, routing by X-AnchorMailbox (default 1)",
    )
    simulator.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end a kept-alive connection idle this long (with --idle-action)",
    )
    simulator.add_argument(
        "--idle-action",
        choices=IDLE_ACTIONS,
        default="close",
        help="how: close (FIN), reset (RST) or drop (never answer again); default %(default)s",
    )
    simulator.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="none",
        help="authenticate EWS requests as IIS does; NTLM accounts come from NTLM_USER_FILE",
    )
    simulator.add_argument(
        "--accounts", metavar="FILE", help="for --auth basic: user:password lines"
    )
    simulator.add_argument(
        "--keytab", metavar="FILE", help="for --auth kerberos: the HTTP/host service keys"
    )
    simulator.add_argument(
        "--tls-cert", metavar="FILE", help="serve https with this PEM certificate (and key)"
    )
    simulator.add_argument("--tls-key", metavar="FILE", help="the PEM key of --tls-cert")
    simulator.set_defaults(run=_simulator)
    return parser


def _listen_address(option: str) -> Callable[[str], str]:
    """Return an argparse type that accepts HOST:PORT or [IPv6]:PORT for OPTION."""

    def listen_address(value: str) -> str:
        try:
            check_bind(value, option)
        except ConfigError as error:
            # argparse names the option itself.
            message = str(error).removeprefix(f"{option}: ").removeprefix(f"{option} ")
            raise argparse.ArgumentTypeError(message) from None
        return value

    return listen_address


def _serve(_args: argparse.Namespace) -> int:
    return serve(Config.from_env(os.environ))


def _check(_args: argparse.Namespace) -> int:
    config = Config.from_env(os.environ)
    # Log lines (the transport's, the security library's) go to stderr; the steps to stdout.
    configure_logging(LogLevels.named(config.log_level, config.library_log_level))
    summary = " ".join(f"{name}={value}" for name, value in config.summary().items())
    print(f"ews-gateway check: {summary}", flush=True)
    for warning in config.warnings:
        print(f"warn config   {warning}", flush=True)
    return 0 if build_check(config).run(_print_step) else 1


def _print_step(result: StepResult) -> None:
    print(f"{'ok' if result.passed else 'FAIL':<4} {result.step:<9}{result.sentence}", flush=True)


def _simulator(args: argparse.Namespace) -> int:
    if args.mailbox_servers < 1:
        raise SystemExit("ews-gateway simulator: --mailbox-servers must be at least 1")
    try:
        idle = (
            None if args.idle_seconds is None else idle_policy(args.idle_seconds, args.idle_action)
        )
    except InvalidIdlePolicy as error:
        raise SystemExit(f"ews-gateway simulator: --idle-seconds: {error}") from None
    try:
        acceptor = acceptor_for(args.auth, accounts=args.accounts, keytab=args.keytab)
    except (ValueError, OSError) as error:
        raise SystemExit(f"ews-gateway simulator: {error}") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("ews-gateway simulator: --tls-cert and --tls-key go together")
    tls = TlsIdentity(args.tls_cert, args.tls_key) if args.tls_cert else None
    serve_forever(
        bind=args.bind,
        latency_ms=args.latency_ms,
        step_seconds=args.step_seconds,
        schema_dir=args.schema_dir,
        mailbox_servers=args.mailbox_servers,
        idle=idle,
        acceptor=acceptor,
        tls=tls,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    bind_setting = "--bind" if args.bind else "GATEWAY_BIND"
    simulator_bind = args.simulator_bind or f"127.0.0.1:{_free_loopback_port()}"
    environ = {
        **os.environ,
        "EWS_URL": f"http://{simulator_bind}/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": os.environ.get("GATEWAY_DIAL_ALLOW", DEMO_DIAL_ALLOW),
        "GATEWAY_BIND": args.bind or os.environ.get("GATEWAY_BIND", DEMO_BIND),
    }
    # Only the demo serves the call screen (never `serve`).
    config = replace(Config.from_env(environ), demo_page=True)
    # Both ports are checked before anything starts or is printed: a busy one is one line.
    ensure_can_listen(config.bind, bind_setting)
    ensure_can_listen(simulator_bind, "--simulator-bind")
    simulator = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulator", "--bind", simulator_bind]
    )
    try:
        _wait_until_up(f"http://{simulator_bind}/simulator/health", simulator)
        _print_demo_banner(config, simulator_bind)
        return serve(config)
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SIMULATOR_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("ews-gateway: the EWS simulator exited during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback URL we built
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("ews-gateway: the EWS simulator did not start in time")


def _print_demo_banner(config: Config, simulator_bind: str) -> None:
    base = f"http://{config.bind}"
    dial_allow = ",".join(config.dial_allow or ())
    ews_url = f"http://{simulator_bind}/EWS/Exchange.asmx"
    faults = f"http://{simulator_bind}/simulator/faults"
    print(
        f"""
==========================================================================
  DEMO MODE: the gateway is talking to the built-in EWS SIMULATOR at
  {ews_url}
  No real Exchange server is involved and no phone will ring.
  Caller authentication is OFF (GATEWAY_AUTH=none).
  Dial policy: GATEWAY_DIAL_ALLOW={dial_allow} (the demo's default * allows
  EVERY number; production needs a real policy).
==========================================================================
Call screen: {base}/demo/
Try it:
  curl -si -X POST {base}/calls -H 'Content-Type: application/json' \\
       -d '{{"itemId": "AAMkADemoVoiceMail", "dialString": "+15551234567"}}'
  curl -si {base}/calls/<callId from the answer>
  curl -N {base}/calls/<callId>/events
  curl -si -X DELETE {base}/calls/<callId>
  curl -s {base}/metrics | grep ews_gateway_
Make the simulator fail like Exchange (kinds and their parameters: docs/simulator.md):
  curl -s -X PUT {faults} -H 'Content-Type: application/json' \\
       -d '{{"faults": [{{"kind": "busy", "backOffMs": 3000, "count": 1}}]}}'
  curl -s -X DELETE {faults}
  curl -s http://{simulator_bind}/simulator/requests
""",
        file=sys.stderr,
        flush=True,
    )
