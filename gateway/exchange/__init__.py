"""Talking to Exchange: everything between a phone-call operation and Exchange's answer.

Owns: SOAP envelopes (`envelopes`, the only module that knows zeep) and the WSDL they come
from, reading EWS answers (`replies`), the EWS client that sends one operation under the
deadline, bulkhead, circuit breaker and retry policy (`client`, `resilience`), HTTP/1.1 to
Exchange (`transport`, `http1`, `connector`, `proxy`) and the gateway's own authentication
to it (`auth`, `tickets`). Returns plain dataclasses; raises `gateway.errors`.

May import: `gateway.errors`, `gateway.wire` and the package version. Reports what each call
did through `client.ExchangeObserver`, which `gateway.telemetry` implements.
"""
