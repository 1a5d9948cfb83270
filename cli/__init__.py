"""The `byzps` command line: the composition root that wires server, workers and attacks."""
