"""Embedded PanDA-compatible dispatcher (WSGI + SQLite).

``EmbeddedServer`` runs it in a background thread (tests, the demo);
``serve_main``/``submit_main``/``status_main`` are ``pilot serve``,
``pilot submit`` and ``pilot status``.
"""

from __future__ import annotations

from pilot.server.serve import EmbeddedServer, serve_main
from pilot.server.submit import status_main, submit_main

__all__ = ["EmbeddedServer", "serve_main", "status_main", "submit_main"]
