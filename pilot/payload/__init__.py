"""Build the payload command and run it in its own process group."""
