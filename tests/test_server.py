"""gunicorn settings: the values keep the order and sizes docs/operations.md promises."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
from collections import deque
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.workers.gthread import ThreadWorker

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.guards.embeddedstore import FILE_NAME, EmbeddedStore, SqliteKeys
from gateway.serving import server as server_module
from gateway.serving.server import (
    GatewayServer,
    GatewayThreadWorker,
    _begin_close,
    _fresh_state_dir,
    ensure_can_listen,
    gunicorn_options,
)

BASE_ENV = {"EWS_URL": "https://mail.example.com/EWS/Exchange.asmx", "GATEWAY_AUTH": "none"}
# nginx's proxy_read_timeout and keepalive_timeout, and AWS ALB's idle timeout, default to 60 s.
TYPICAL_BALANCER_TIMEOUT_S = 60


def options(**env: str) -> dict[str, Any]:
    return gunicorn_options(Config.from_env({**BASE_ENV, **env}))


def test_workers_are_gthread_so_a_wait_on_exchange_blocks_no_other_request() -> None:
    assert issubclass(options()["worker_class"], ThreadWorker)


def test_by_default_exchange_deadline_lies_inside_worker_timeout_inside_balancer_timeout() -> None:
    assert 10 < options()["timeout"] < TYPICAL_BALANCER_TIMEOUT_S


@pytest.mark.parametrize("seconds", ["0.1", "0.9", "1", "10", "10.9", "59.5", "300"])
def test_calls_get_their_whole_deadline_before_a_worker_is_killed_or_stopped(seconds: str) -> None:
    settings = options(EWS_TIMEOUT_SECONDS=seconds)
    assert float(seconds) < settings["timeout"]
    assert float(seconds) < settings["graceful_timeout"]


def test_keep_alive_outlasts_balancer_idle_timeouts_so_the_balancer_closes_first() -> None:
    assert options()["keepalive"] > TYPICAL_BALANCER_TIMEOUT_S


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this machine")
def test_worker_heartbeat_files_live_on_the_ram_disk() -> None:
    assert options()["worker_tmp_dir"] == "/dev/shm"


def test_workers_are_recycled_with_jitter_so_not_all_at_once() -> None:
    settings = options()
    assert (settings["max_requests"], settings["max_requests_jitter"]) == (250_000, 25_000)


@pytest.mark.parametrize(
    ("raw", "bound", "jitter"), [("1000", 1000, 100), ("1", 1, 0), ("0", 0, 0)]
)
def test_gateway_max_requests_sets_the_recycling_with_a_tenth_of_jitter(
    raw: str, bound: int, jitter: int
) -> None:
    settings = options(GATEWAY_MAX_REQUESTS=raw)
    assert (settings["max_requests"], settings["max_requests_jitter"]) == (bound, jitter)


def test_sizing_defaults_to_one_worker_per_usable_core_and_64_threads() -> None:
    settings = options()
    usable = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    assert settings["workers"] == max(2, len(usable))
    assert settings["threads"] == 64


def test_sizing_follows_gateway_workers_and_gateway_threads() -> None:
    settings = options(GATEWAY_WORKERS="3", GATEWAY_THREADS="7")
    assert (settings["workers"], settings["threads"]) == (3, 7)


def test_gunicorn_logs_json_to_stderr_and_leaves_access_lines_to_the_gateway() -> None:
    settings = options()
    assert settings["accesslog"] is None
    assert settings["errorlog"] == "-"
    assert (
        settings["logconfig_dict"]["formatters"]["json"]["()"]
        == "gateway.telemetry.logs.json_formatter"
    )


def test_at_debug_gunicorn_logs_its_lifecycle_and_libraries_their_warnings() -> None:
    settings = options(GATEWAY_LOG_LEVEL="debug")
    config = settings["logconfig_dict"]
    assert settings["loglevel"] == "info"
    assert config["handlers"]["stderr"]["filters"] == ["levels", "secrets"]
    assert config["filters"]["levels"]["()"] == "gateway.telemetry.logs.LevelGate"
    assert (config["loggers"]["gateway"]["level"], config["root"]["level"]) == (10, 30)


def test_library_debug_lines_reach_gunicorn_only_when_asked_for() -> None:
    settings = options(GATEWAY_LOG_LEVEL="debug", GATEWAY_LIBRARY_LOG_LEVEL="debug")
    assert settings["loglevel"] == "debug"
    assert settings["logconfig_dict"]["root"]["level"] == 10


def test_the_master_removes_the_directories_serve_made_when_it_exits(tmp_path: Path) -> None:
    metrics = tmp_path / "ews-gateway-metrics"
    metrics.mkdir()
    (metrics / "counter_1234.db").write_bytes(b"\0" * 8)
    state = _fresh_state_dir(str(tmp_path))
    server = GatewayServer(Config.from_env(BASE_ENV), scratch_dirs=(str(metrics), state))
    server.cfg.on_exit(server)
    assert list(tmp_path.iterdir()) == []


def test_each_instance_gets_a_private_directory_with_a_new_store(tmp_path: Path) -> None:
    first, second = (Path(_fresh_state_dir(str(tmp_path))) for _ in range(2))

    assert first != second
    assert first.parent == second.parent == tmp_path
    assert first.stat().st_mode & 0o777 == 0o700
    assert (first / FILE_NAME).is_file()
    assert SqliteKeys(EmbeddedStore(first)).claim("k", "r", 60) is None


def test_a_state_directory_that_cannot_be_made_stops_serve_naming_gateway_state_dir(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "removed-after-start-up-checked-it"

    with pytest.raises(ConfigError) as refused:
        _fresh_state_dir(str(gone))

    assert str(refused.value).startswith("GATEWAY_STATE_DIR: cannot create a directory in")


def test_python_warnings_are_logged_as_json_lines_like_everything_else() -> None:
    script = (
        "import warnings; from gateway.telemetry.logs import LogLevels, configure_logging; "
        "configure_logging(LogLevels.named('info')); warnings.warn('a library complains')"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    [line] = run.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert "a library complains" in record["message"]


def test_a_head_may_carry_a_large_bearer_token_within_deliberate_limits() -> None:
    settings = options()

    assert settings["limit_request_field_size"] == 16 * 1024  # a 12 KB JWT fits
    assert settings["limit_request_fields"] == 100
    assert settings["limit_request_line"] == 8190  # gunicorn's largest short of unlimited


@pytest.mark.network
def test_a_port_another_process_listens_on_is_refused_in_one_line_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"

        with pytest.raises(ConfigError) as refused:
            ensure_can_listen(bind, "--bind")

    assert str(refused.value) == f"--bind: cannot listen on {bind}: Address already in use"
    ensure_can_listen(bind, "--bind")  # free again once its listener is gone


def test_a_closing_connection_sends_fin_and_is_closed_by_the_thread_that_answered() -> None:
    server, client = socket.socketpair()
    with client:
        client.sendall(b"what the client still sent")
        client.shutdown(socket.SHUT_WR)

        assert _begin_close(server) is None  # nothing left to wait for

        assert server.fileno() == -1
        assert client.recv(100) == b""  # FIN: the client sees the end of the answer


def lingering_worker() -> SimpleNamespace:
    """The part of a worker that lingers on closing connections, with a real poller."""
    worker = SimpleNamespace(poller=selectors.DefaultSelector(), _closing=deque(), nr_conns=1)
    for name in ("_linger", "_on_closing", "_end_linger", "_end_late_lingers"):
        setattr(worker, name, partial(getattr(GatewayThreadWorker, name), worker))
    return worker


def dispatch(worker: SimpleNamespace) -> None:
    for key, _ in worker.poller.select(5):
        key.data(key.fileobj)


def test_what_a_client_sends_after_its_last_answer_is_dropped_by_the_main_thread() -> None:
    """The thread that answered sends FIN and is free; the poller reads on until the client
    closes too, so its late bytes never turn the close into a reset."""
    server, client = socket.socketpair()
    with client:
        sent = b"a request the client sent before it saw Connection: close"
        client.sendall(sent)
        worker = lingering_worker()
        conn = SimpleNamespace(sock=server, linger_until=0.0, linger_left=64 * 1024)

        assert _begin_close(server) == len(sent)  # dropped; the client has not closed: linger
        assert client.recv(100) == b""  # FIN already sent
        worker._linger(conn)
        client.sendall(b"and more")
        dispatch(worker)
        assert server.fileno() != -1
        assert worker.nr_conns == 1

        client.close()
        dispatch(worker)

    assert server.fileno() == -1
    assert worker.nr_conns == 0
    assert not worker._closing


def test_a_client_that_keeps_sending_after_its_last_answer_is_closed_after_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "CLOSE_LINGER_S", 0.0)
    server, client = socket.socketpair()
    with client:
        worker = lingering_worker()
        conn = SimpleNamespace(sock=server, linger_until=0.0, linger_left=64 * 1024)
        assert _begin_close(server) == 0
        worker._linger(conn)
        client.sendall(b"still sending")

        worker._end_late_lingers()

    assert server.fileno() == -1
    assert worker.nr_conns == 0


def test_a_connection_closed_by_its_thread_is_counted_off_once() -> None:
    server, client = socket.socketpair()
    server.close()
    client.close()
    worker = SimpleNamespace(nr_conns=3)
    answered = Future()  # what gthread's pool hands back: the request was answered, kept
    answered.set_result(True)

    GatewayThreadWorker.finish_request(worker, SimpleNamespace(sock=server), answered)

    assert worker.nr_conns == 2
