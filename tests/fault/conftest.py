"""The fault tests launch ``pilot hpc`` as the MPI tests do, with their fixtures."""

from tests.mpi.conftest import launched, server

__all__ = ["launched", "server"]
