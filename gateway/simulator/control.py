"""The JSON control API under /simulator/: inspect calls and requests, set fault rules."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from gateway.simulator.calls import CallView
from gateway.simulator.exchange import FakeExchange
from gateway.simulator.faults import InvalidFaultRule, parse_rules
from gateway.simulator.idle import InvalidIdlePolicy, parse_idle_policy
from gateway.simulator.outcomes import Reply

CONTROL_PREFIX = "/simulator/"
JSON_CONTENT_TYPE = "application/json"

_Route = Callable[[FakeExchange, bytes], Reply]


def json_reply(status: int, document: object, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """Render a JSON answer."""
    body = json.dumps(document, indent=2).encode("utf-8") + b"\n"
    return Reply(status, body, JSON_CONTENT_TYPE, headers)


def not_found(path: str) -> Reply:
    """Answer a path the simulator does not serve."""
    return json_reply(404, {"error": f"no such path: {path}"})


def method_not_allowed(method: str, path: str, allowed: list[str]) -> Reply:
    """Answer a known path asked with the wrong method, listing the right ones."""
    message = f"{method} is not allowed on {path}; use {', '.join(allowed)}"
    return json_reply(405, {"error": message}, (("Allow", ", ".join(allowed)),))


def handle_control(exchange: FakeExchange, method: str, path: str, body: bytes) -> Reply:
    """Answer one control API request."""
    routes = _ROUTES.get(path.removeprefix(CONTROL_PREFIX))
    if routes is None:
        return not_found(path)
    route = routes.get(method)
    if route is None:
        return method_not_allowed(method, path, list(routes))
    return route(exchange, body)


def _health(_exchange: FakeExchange, _body: bytes) -> Reply:
    return json_reply(200, {"status": "ok", "simulator": True})


def _list_calls(exchange: FakeExchange, _body: bytes) -> Reply:
    if exchange.deployment is not None:
        calls = [_call_json(call, server) for server, call in exchange.deployment.all_calls()]
        return json_reply(200, calls)
    return json_reply(200, [_call_json(call) for call in exchange.calls.all_calls()])


def _call_json(call: CallView, server: str | None = None) -> dict[str, object]:
    described: dict[str, object] = {
        "id": call.call_id,
        "mailbox": call.mailbox,
        "state": call.phase.state,
        "connectionFailureCause": call.phase.failure_cause,
        "dialString": call.dial_string,
    }
    if server is not None:
        described["server"] = server
    return described


def _list_mailboxes(exchange: FakeExchange, _body: bytes) -> Reply:
    return json_reply(200, [mailbox.as_json() for mailbox in exchange.directory.mailboxes])


def _list_requests(exchange: FakeExchange, _body: bytes) -> Reply:
    return json_reply(200, [request.as_json() for request in exchange.journal.recorded()])


def _clear_requests(exchange: FakeExchange, _body: bytes) -> Reply:
    exchange.journal.clear()
    return json_reply(200, [])


def _list_faults(exchange: FakeExchange, _body: bytes) -> Reply:
    return json_reply(200, {"faults": exchange.faults.describe()})


def _replace_faults(exchange: FakeExchange, body: bytes) -> Reply:
    try:
        rules = parse_rules(json.loads(body))
    except json.JSONDecodeError as error:
        return json_reply(400, {"error": f"the body is not JSON: {error}"})
    except UnicodeDecodeError:
        return json_reply(400, {"error": "the body is not UTF-8 JSON"})
    except InvalidFaultRule as error:
        return json_reply(400, {"error": str(error)})
    exchange.faults.replace(rules)
    return _list_faults(exchange, body)


def _clear_faults(exchange: FakeExchange, body: bytes) -> Reply:
    exchange.faults.clear()
    return _list_faults(exchange, body)


def _show_idle(exchange: FakeExchange, _body: bytes) -> Reply:
    policy = exchange.idle_policy
    return json_reply(200, {"idle": None if policy is None else policy.as_json()})


def _set_idle(exchange: FakeExchange, body: bytes) -> Reply:
    try:
        exchange.idle_policy = parse_idle_policy(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return json_reply(400, {"error": "the body is not UTF-8 JSON"})
    except InvalidIdlePolicy as error:
        return json_reply(400, {"error": str(error)})
    return _show_idle(exchange, body)


def _clear_idle(exchange: FakeExchange, body: bytes) -> Reply:
    exchange.idle_policy = None
    return _show_idle(exchange, body)


def _index(_exchange: FakeExchange, _body: bytes) -> Reply:
    """List the control API, so the URL the banner prints is a working start."""
    endpoints = {
        CONTROL_PREFIX + name: sorted(methods) for name, methods in _ROUTES.items() if name
    }
    return json_reply(200, {"simulator": True, "endpoints": endpoints})


_ROUTES: Mapping[str, Mapping[str, _Route]] = {
    "": {"GET": _index},
    "health": {"GET": _health},
    "calls": {"GET": _list_calls},
    "mailboxes": {"GET": _list_mailboxes},
    "requests": {"GET": _list_requests, "DELETE": _clear_requests},
    "faults": {"GET": _list_faults, "PUT": _replace_faults, "DELETE": _clear_faults},
    "idle": {"GET": _show_idle, "PUT": _set_idle, "DELETE": _clear_idle},
}
