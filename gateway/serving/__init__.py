"""Serving: gunicorn configured by the gateway, and the front door that reads each request.

Owns: the gunicorn application, worker and hooks (`server`) and reading requests off the
socket, answering those that cannot be read (`frontdoor`).

May import: `gateway.app`, `gateway.config` and everything below them.
"""
