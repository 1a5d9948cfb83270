"""Transport-free learning logic shared by the server, the workers and the simulator.

Everything here is pure tensor code: compressors, estimators (worker-side state machines), server
rules, robust aggregators, tasks and seeding. Nothing in this package knows about gRPC, so the
simulator and the gRPC daemons run the very same rules.
"""
