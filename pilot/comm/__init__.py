"""Upstreams: the PanDA server, Harvester shared files, a local job file."""
