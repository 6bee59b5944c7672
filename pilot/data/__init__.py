"""Stage-in and stage-out: copytools, checksums and transfer traces."""
