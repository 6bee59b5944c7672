"""Rank 0 of the MPI mode: the range ledger, its journal, the scheduler and the master loop."""
