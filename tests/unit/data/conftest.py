"""Fixtures of the data tests: the loopback HTTP server."""

from tests.unit.data.httpserver import http_server  # noqa: F401 - re-exported as a fixture
