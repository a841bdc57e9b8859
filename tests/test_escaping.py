"""Call ids from the URL reach Exchange byte for byte, through the API and the real SOAP layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree
from prometheus_client import CollectorRegistry

from gateway import wire
from gateway.app import create_app
from gateway.config import Config
from gateway.exchange.client import EwsClient
from gateway.exchange.transport import ExchangeReply

DISCONNECTED = f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="{wire.SOAP_ENV_NS}">
  <s:Body>
    <m:DisconnectPhoneCallResponse ResponseClass="Success" xmlns:m="{wire.MESSAGES_NS}">
      <m:ResponseCode>NoError</m:ResponseCode>
    </m:DisconnectPhoneCallResponse>
  </s:Body>
</s:Envelope>
""".encode()

PHONE_CALL_ID = f"{{{wire.MESSAGES_NS}}}PhoneCallId"
MAX_CALL_ID_CHARS = 512

ONE_APP_MANY_EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass
class RecordingTransport:
    """Answers every envelope with a DisconnectPhoneCall success and keeps what was sent."""

    bodies: list[bytes] = field(default_factory=list)

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        self.bodies.append(body)
        return ExchangeReply(
            status=200,
            content_type="text/xml; charset=utf-8",
            retry_after=None,
            location=None,
            body=DISCONNECTED,
        )


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def client(transport: RecordingTransport) -> FlaskClient:
    config = Config(ews_url="http://exchange.invalid/EWS/Exchange.asmx", gateway_auth="none")
    ews = EwsClient(transport, server_version="Exchange2010")
    return create_app(config, ews=ews, registry=CollectorRegistry()).test_client()


def accepted_call_ids() -> st.SearchStrategy[str]:
    printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    return st.text(printable, min_size=1, max_size=MAX_CALL_ID_CHARS)


def rejected_call_ids() -> st.SearchStrategy[str]:
    """Ids with at least one character outside 0x21-0x7e, or too long."""
    any_char = st.characters(codec="utf-8")  # every code point a URL can carry (no surrogates)
    outside = st.one_of(
        st.characters(max_codepoint=0x20),
        st.just("\x7f"),
        st.characters(min_codepoint=0x80, codec="utf-8"),
    )
    with_a_bad_char = st.tuples(
        st.text(any_char, max_size=40), outside, st.text(any_char, max_size=40)
    ).map("".join)
    too_long = st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E),
        min_size=MAX_CALL_ID_CHARS + 1,
        max_size=2 * MAX_CALL_ID_CHARS,
    )
    return st.one_of(with_a_bad_char, too_long)


def sent_call_ids(transport: RecordingTransport) -> list[str | None]:
    ids = []
    for body in transport.bodies:
        envelope = etree.fromstring(body)
        ids.extend(element.get("Id") for element in envelope.iter(PHONE_CALL_ID))
    return ids


@ONE_APP_MANY_EXAMPLES
@given(call_id=accepted_call_ids())
@example(call_id='"')
@example(call_id="<&>'\"")
@example(call_id="&amp;&#60;]]>")
@example(call_id="a//b")
@example(call_id="%2F%00")
@example(call_id="/")
def test_an_accepted_call_id_reaches_exchange_byte_for_byte(
    client: FlaskClient, transport: RecordingTransport, call_id: str
) -> None:
    transport.bodies.clear()

    response = client.delete("/calls/" + quote(call_id, safe=""))

    assert response.status_code == 200
    assert response.get_json()["callId"] == call_id
    assert sent_call_ids(transport) == [call_id]


@ONE_APP_MANY_EXAMPLES
@given(call_id=rejected_call_ids())
@example(call_id=" ")
@example(call_id="call\n")
@example(call_id="\x00")
@example(call_id="caf\u00e9")
@example(call_id="x" * (MAX_CALL_ID_CHARS + 1))
def test_a_rejected_call_id_is_400_and_nothing_is_sent_to_exchange(
    client: FlaskClient, transport: RecordingTransport, call_id: str
) -> None:
    transport.bodies.clear()

    response = client.delete("/calls/" + quote(call_id, safe=""))

    assert response.status_code == 400
    assert transport.bodies == []
