"""What happens to a kept-alive connection left idle: how balancers, NATs and IIS end it.

IIS closes an idle connection in an orderly way (FIN) after its connection
timeout; some balancers reset it (RST) after about 350 s; cloud NATs forget
the flow silently after about 4 minutes, so the next request on it is never
answered and the client waits for its whole timeout. The simulator plays one
of these after a configurable idle time (`--idle-seconds`, `--idle-action`,
or PUT /simulator/idle).
"""

from __future__ import annotations

from dataclasses import dataclass

IDLE_ACTIONS = ("close", "reset", "drop")


class InvalidIdlePolicy(ValueError):
    """An idle policy document or flag that cannot be used; the message says why."""


@dataclass(frozen=True)
class IdlePolicy:
    """After `after_s` seconds without a request, `action` the connection."""

    after_s: float
    action: str

    def as_json(self) -> dict[str, object]:
        return {"afterSeconds": self.after_s, "action": self.action}


def idle_policy(after_s: object, action: object) -> IdlePolicy:
    """Build a policy from untrusted values, refusing nonsense."""
    if isinstance(after_s, bool) or not isinstance(after_s, int | float) or not after_s > 0:
        raise InvalidIdlePolicy("afterSeconds must be a positive number of seconds")
    if action not in IDLE_ACTIONS:
        raise InvalidIdlePolicy(f"action must be one of {', '.join(IDLE_ACTIONS)}")
    return IdlePolicy(float(after_s), str(action))


def parse_idle_policy(document: object) -> IdlePolicy:
    """Read {"afterSeconds": N, "action": "close" | "reset" | "drop"}."""
    if not isinstance(document, dict):
        raise InvalidIdlePolicy('send {"afterSeconds": N, "action": "close|reset|drop"}')
    return idle_policy(document.get("afterSeconds"), document.get("action"))
