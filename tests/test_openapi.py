"""openapi.yaml is valid OpenAPI 3.1 and describes exactly the routes the app serves."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.errors import ERROR_BY_RESPONSE_CODE, GatewayError

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"
HTTP_METHODS = {"get", "post", "put", "delete", "patch"}


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return spec


def served_routes() -> set[tuple[str, str]]:
    config = Config(ews_url="http://exchange.invalid/EWS/Exchange.asmx", gateway_auth="none")
    app = create_app(config, ews=object(), registry=CollectorRegistry())  # type: ignore[arg-type]
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?call_id>", "{callId}", rule.rule)
        for method in rule.methods or ():
            if method.lower() in HTTP_METHODS:
                routes.add((path, method.lower()))
    return routes


def documented_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_the_spec_is_valid_openapi_3_1() -> None:
    spec = load_spec()
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_the_spec_documents_exactly_the_served_routes() -> None:
    assert documented_routes(load_spec()) == served_routes()


def test_every_status_the_mapping_table_can_produce_is_documented_for_each_call_route() -> None:
    spec = load_spec()
    statuses = {str(error.status) for error in ERROR_BY_RESPONSE_CODE.values()}
    statuses |= {"400", "502", "504"}
    for path, method in [
        ("/calls/{callId}", "get"),
        ("/calls/{callId}", "delete"),
        ("/calls", "post"),
        # The stream's first state is read before its status is chosen.
        ("/calls/{callId}/events", "get"),
    ]:
        documented = set(spec["paths"][path][method]["responses"])
        assert statuses <= documented, (path, method, statuses - documented)


def test_the_package_serves_the_same_spec_as_the_repository() -> None:
    packaged = resources.files("gateway").joinpath("openapi.yaml").read_bytes()
    assert packaged == SPEC_PATH.read_bytes()


def test_every_problem_type_slug_fits_in_a_urn() -> None:
    for error_class in [*ERROR_BY_RESPONSE_CODE.values(), GatewayError]:
        assert re.fullmatch(r"[a-z0-9-]+", error_class.slug)


def test_every_call_route_documents_the_refusals_of_the_front_door() -> None:
    # Any path gets them (gateway/serving/frontdoor.py), the event stream's included.
    spec = load_spec()
    for path, item in spec["paths"].items():
        if not path.startswith("/calls"):
            continue
        for method, operation in item.items():
            if method in HTTP_METHODS:
                missing = {"408", "414", "431"} - set(operation["responses"])
                assert not missing, (path, method, missing)
