"""The hand-written baseline: Flask + requests, the envelope formatted as a string.

What a developer writes in an afternoon for DELETE /calls/<id>: no validation,
metrics, logs or error mapping, only XML escaping and a minimal read of the answer.
gunicorn serves it as `benchmarks.baseline:create_app()` with BASELINE_EWS_URL set.
"""

from __future__ import annotations

import os
from xml.sax.saxutils import quoteattr

import requests
from flask import Flask, Response, jsonify
from lxml import etree
from requests.adapters import HTTPAdapter

SOAP = "{http://schemas.xmlsoap.org/soap/envelope/}"
MESSAGES = "{http://schemas.microsoft.com/exchange/services/2006/messages}"
HEADERS = {
    "Content-Type": "text/xml; charset=utf-8",
    "SOAPAction": '"http://schemas.microsoft.com/exchange/services/2006/messages/'
    'DisconnectPhoneCall"',
}
ENVELOPE = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types" '
    'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">'
    '<soap:Header><t:RequestServerVersion Version="Exchange2010"/></soap:Header>'
    "<soap:Body><m:DisconnectPhoneCall><m:PhoneCallId Id={call_id}/>"
    "</m:DisconnectPhoneCall></soap:Body></soap:Envelope>"
)


def create_app(ews_url: str | None = None, pool_size: int | None = None) -> Flask:
    """Build the baseline app; by default from BASELINE_EWS_URL and BASELINE_POOL_SIZE."""
    url = ews_url or os.environ["BASELINE_EWS_URL"]
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=pool_size or _env_pool_size()))
    app = Flask(__name__)

    @app.delete("/calls/<call_id>")
    def disconnect_call(call_id: str) -> tuple[Response, int]:
        envelope = ENVELOPE.format(call_id=quoteattr(call_id))
        answer = session.post(url, data=envelope.encode(), headers=HEADERS, timeout=10)
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        message = etree.fromstring(answer.content, parser).find(
            f"{SOAP}Body/{MESSAGES}DisconnectPhoneCallResponse"
        )
        if answer.status_code != 200 or message is None:
            return jsonify(error=f"Exchange answered HTTP {answer.status_code}"), 502
        code = message.findtext(f"{MESSAGES}ResponseCode")
        if message.get("ResponseClass") == "Error":
            return jsonify(error=code), 502
        return jsonify(callId=call_id, status="disconnected", ewsResponseCode=code), 200

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    return app


def _env_pool_size() -> int:
    return int(os.environ.get("BASELINE_POOL_SIZE", "32"))
