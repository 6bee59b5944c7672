"""Real payloads shipped for the demo, the tests and commissioning."""
