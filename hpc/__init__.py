"""MPI transport, rank roles, batch-system resources and batch scripts."""
