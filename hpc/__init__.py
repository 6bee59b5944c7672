"""What the MPI ranks share: transport, wire records, batch systems, resources.

Nothing here imports yoda or droid (docs/DESIGN.md, "What each package may import"):
the rank roles live beside their code, in yoda.rank and droid.rank, and pilot.ranks
picks one per rank."""
