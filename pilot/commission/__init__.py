"""Commissioning: template jobs through a queue, two pilots compared."""
