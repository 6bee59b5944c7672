"""Ranks > 0 of the MPI mode: ask Yoda for ranges, run them with the shared payload code, report."""
