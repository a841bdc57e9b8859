"""What operators see: Prometheus metrics, OpenTelemetry traces and JSON log lines.

Owns: `metrics` (the only module that knows prometheus-client), `tracing` (the only module
that knows OpenTelemetry), `logs` (the log format, which loggers write at which level, the
scrubbing of secrets from what libraries write, and the per-request log fields) and the
observer the EWS client reports through (`exchange_calls`).

May import: `gateway.exchange` and `gateway.guards` (for the types they report), and
`gateway.errors`, `gateway.wire`.
"""
