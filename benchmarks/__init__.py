"""Load benchmarks: the gateway against a hand-written Flask + requests baseline.

Run `python -m benchmarks.run` (or `--quick` for a smoke run of a few seconds).
Nothing here is imported by the gateway.
"""
