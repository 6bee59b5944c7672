"""Watch the payload: memory, CPU, looping, disk, walltime, outbound connections."""
