"""Fault rules: the misbehaviour a test or a frontend developer asks the simulator for."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway import wire

HANG_DEFAULT_MS = 300_000
BUSY_DEFAULT_BACK_OFF_MS = 5_000
# Bigger answers prove nothing more about a client's size limit and only eat memory and time.
HUGE_MAX_MEGABYTES = 1024

# SIP status codes (RFC 3261 section 7.2): three digits, 1xx to 6xx.
SIP_CODE_MIN, SIP_CODE_MAX = 100, 699

# Codes end up in a faultcode QName, so they must be NCNames; URLs end up in a quoted SYSTEM id.
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SYSTEM_LITERAL = re.compile(r'[^\s"<>]+')


class InvalidFaultRule(ValueError):
    """Raised when a fault rule from the control API cannot be used; the message says why."""


@dataclass(frozen=True)
class _Param:
    kind: type[int] | type[str]
    default: int | None = None
    required: bool = False
    minimum: int = 0
    maximum: int | None = None
    pattern: re.Pattern[str] | None = None


_KIND_PARAMS: Mapping[str, Mapping[str, _Param]] = {
    "latency": {"ms": _Param(int, required=True)},
    "busy": {"backOffMs": _Param(int, default=BUSY_DEFAULT_BACK_OFF_MS)},
    "ews-error": {"code": _Param(str, required=True, pattern=_NCNAME), "backOffMs": _Param(int)},
    "fault": {"code": _Param(str, required=True, pattern=_NCNAME)},
    "warning": {"message": _Param(str, required=True)},
    "sip": {
        "code": _Param(int, required=True, minimum=SIP_CODE_MIN, maximum=SIP_CODE_MAX),
        "text": _Param(str),
    },
    "http-401": {},
    "http-503": {"retryAfter": _Param(int)},
    "html-500": {},
    "redirect": {},
    "malformed": {},
    "not-soap": {},
    "hang": {"ms": _Param(int, default=HANG_DEFAULT_MS)},
    "reset": {},
    "billion-laughs": {},
    "external-entity": {"url": _Param(str, required=True, pattern=_SYSTEM_LITERAL)},
    "huge": {"megabytes": _Param(int, required=True, minimum=1, maximum=HUGE_MAX_MEGABYTES)},
}
KINDS = tuple(_KIND_PARAMS)
# Kinds that make sense for one operation only: a rule of such a kind is bound to it.
_KIND_OPERATION: Mapping[str, str] = {"sip": wire.GET_PHONE_CALL_INFORMATION}
_COMMON_FIELDS = frozenset({"kind", "rate", "count", "operation"})


@dataclass(frozen=True)
class FaultRule:
    """One validated rule; `params` holds the kind's parameters with defaults filled in."""

    kind: str
    rate: float = 1.0
    count: int | None = None
    operation: str | None = None
    params: Mapping[str, int | str] = field(default_factory=dict)

    def number(self, name: str) -> int | None:
        """Return an integer parameter, or None when the rule leaves it out."""
        value = self.params.get(name)
        return value if isinstance(value, int) else None

    def text(self, name: str) -> str:
        """Return a required text parameter."""
        return str(self.params[name])

    def optional_text(self, name: str) -> str | None:
        """Return a text parameter, or None when the rule leaves it out."""
        value = self.params.get(name)
        return value if isinstance(value, str) else None

    def as_json(self, remaining: int | None) -> dict[str, object]:
        """Describe the rule as the control API shows it, with its remaining count."""
        described: dict[str, object] = {"kind": self.kind, "rate": self.rate}
        if remaining is not None:
            described["count"] = remaining
        if self.operation is not None:
            described["operation"] = self.operation
        return described | dict(self.params)


@dataclass(frozen=True)
class FiredRule:
    """A rule that fired for one request, with the event that releases a hanging answer."""

    rule: FaultRule
    released: threading.Event


def parse_rules(payload: object) -> list[FaultRule]:
    """Validate a `{"faults": [rule, ...]}` document from the control API."""
    if not isinstance(payload, dict) or set(payload) != {"faults"}:
        raise InvalidFaultRule('expected a JSON object {"faults": [rule, ...]}')
    rules = payload["faults"]
    if not isinstance(rules, list):
        raise InvalidFaultRule('"faults" must be a list of rules')
    return [parse_rule(rule, f"faults[{index}]") for index, rule in enumerate(rules)]


def parse_rule(raw: object, where: str) -> FaultRule:
    """Validate one rule; `where` names it in error messages."""
    if not isinstance(raw, dict):
        raise InvalidFaultRule(f"{where} must be a JSON object")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in _KIND_PARAMS:
        raise InvalidFaultRule(f"{where}.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    specs = _KIND_PARAMS[kind]
    unknown = sorted(set(raw) - _COMMON_FIELDS - set(specs))
    if unknown:
        raise InvalidFaultRule(f"{where} has unknown field(s) {unknown} for kind {kind!r}")
    return FaultRule(
        kind=kind,
        rate=_rate(raw.get("rate", 1.0), where),
        count=_count(raw.get("count"), where),
        operation=_kind_operation(kind, _operation(raw.get("operation"), where), where),
        params=_params(raw, specs, where),
    )


def _rate(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidFaultRule(f"{where}.rate must be a number from 0 to 1, not {value!r}")
    return float(value)


def _count(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidFaultRule(f"{where}.count must be a positive integer, not {value!r}")
    return value


def _operation(value: object, where: str) -> str | None:
    if value is None or value in wire.OPERATIONS:
        return value
    raise InvalidFaultRule(
        f"{where}.operation must be one of {', '.join(wire.OPERATIONS)}, not {value!r}"
    )


def _kind_operation(kind: str, operation: str | None, where: str) -> str | None:
    bound = _KIND_OPERATION.get(kind)
    if bound is None:
        return operation
    if operation not in (None, bound):
        raise InvalidFaultRule(f"{where} of kind {kind!r} applies only to {bound}")
    return bound


def _params(
    raw: dict[str, object], specs: Mapping[str, _Param], where: str
) -> dict[str, int | str]:
    params: dict[str, int | str] = {}
    for name, spec in specs.items():
        value = raw.get(name, spec.default)
        if value is None:
            if spec.required:
                raise InvalidFaultRule(f"{where} of kind {raw['kind']!r} needs {name!r}")
            continue
        params[name] = _checked(value, spec, f"{where}.{name}")
    return params


def _checked(value: object, spec: _Param, where: str) -> int | str:
    if spec.kind is str:
        if not isinstance(value, str) or not value:
            raise InvalidFaultRule(f"{where} must be a non-empty string, not {value!r}")
        if spec.pattern is not None and spec.pattern.fullmatch(value) is None:
            raise InvalidFaultRule(f"{where} {value!r} does not match {spec.pattern.pattern!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < spec.minimum:
        raise InvalidFaultRule(f"{where} must be an integer >= {spec.minimum}, not {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise InvalidFaultRule(f"{where} must be at most {spec.maximum}, not {value!r}")
    return value


@dataclass
class _ActiveRule:
    rule: FaultRule
    remaining: int | None


class FaultBook:
    """Hold the active rules and decide which one fires; safe to share between threads."""

    def __init__(self, *, chance: Callable[[], float] = random.random) -> None:
        self._chance = chance
        self._rules: list[_ActiveRule] = []
        self._released = threading.Event()
        self._lock = threading.Lock()

    def replace(self, rules: Sequence[FaultRule]) -> None:
        """Make `rules` the active rules, releasing answers held by the old ones."""
        with self._lock:
            self._rules = [_ActiveRule(rule, rule.count) for rule in rules]
            self._release_hangs_locked()

    def clear(self) -> None:
        """Drop every rule and release every hanging answer."""
        self.replace([])

    def release_hangs(self) -> None:
        """Let every hanging answer go now (used when the server stops)."""
        with self._lock:
            self._release_hangs_locked()

    def describe(self) -> list[dict[str, object]]:
        """Return the active rules as the control API shows them."""
        with self._lock:
            return [active.rule.as_json(active.remaining) for active in self._rules]

    def pick(self, operation: str) -> FiredRule | None:
        """Return the first rule that fires for this operation, counting it down."""
        with self._lock:
            for active in self._rules:
                if active.rule.operation not in (None, operation):
                    continue
                if self._chance() >= active.rule.rate:
                    continue
                if active.remaining is not None:
                    active.remaining -= 1
                    if active.remaining == 0:
                        self._rules.remove(active)
                return FiredRule(active.rule, self._released)
            return None

    def _release_hangs_locked(self) -> None:
        self._released.set()
        self._released = threading.Event()
