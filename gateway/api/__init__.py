"""The HTTP API: routes, problem+json, event streams and the call screen.

Owns: the routes and request hooks (`routes`, the only module that knows `flask.request`),
rendering every problem+json body, access-log line and CORS header set (`problems`), event
streams (`events` frames them and says which states a watcher is sent, `streams` writes
them, `pollers` asks Exchange, `slots` bounds how many a worker and a caller hold, `handoff`
takes the socket over from gunicorn) and the demo's call screen (`callscreen`).

May import: `gateway.telemetry`, `gateway.guards`, `gateway.exchange`, `gateway.errors`,
`gateway.wire`.
"""
