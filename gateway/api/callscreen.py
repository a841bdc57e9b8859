"""The call screen: one static page the demo serves at /demo/ (never `serve`)."""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Flask, Response, redirect

bp = Blueprint("callscreen", __name__)


@bp.get("/demo/")
def page() -> Response:
    """Serve the call screen."""
    html = resources.files("gateway").joinpath("demo/index.html").read_bytes()
    response = Response(html, 200, content_type="text/html; charset=utf-8")
    # The page talks to whatever gateway its user names; it must not be framed by others.
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/demo")
def to_page() -> Response:
    """Send /demo to /demo/, so the page's relative URLs resolve alike."""
    return redirect("/demo/", 308)  # type: ignore[return-value]


def register(app: Flask) -> None:
    """Serve the call screen from APP."""
    app.register_blueprint(bp)
