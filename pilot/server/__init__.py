"""Embedded PanDA-compatible dispatcher (WSGI + SQLite)."""
