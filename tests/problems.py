"""RFC 9457 problem answers, as every error the gateway gives must be one."""

from __future__ import annotations

from typing import Any, cast

from werkzeug.test import TestResponse

PROBLEM_FIELDS = {"type", "title", "status", "detail", "requestId"}


def assert_problem(response: TestResponse, status: int) -> dict[str, Any]:
    """Check the response is an RFC 9457 problem with this status and return its body."""
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body.keys() >= PROBLEM_FIELDS
    assert body["status"] == status
    assert body["requestId"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    return cast(dict[str, Any], body)
