"""The `byzps` command line: the composition root that wires server, workers and attacks.

gRPC's C core logs to stderr on its own ("Got goaway ...", "Failed to add port ..."), which
drowns the one-line messages the CLI gives for the same events; it reads GRPC_VERBOSITY once,
when grpc is first imported, so it is silenced here, before any command module imports grpc. An
explicit setting in the environment wins: GRPC_VERBOSITY=ERROR (or DEBUG) brings its lines back.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
