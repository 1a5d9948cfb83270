"""The in-process simulator: the server's round engine plus all workers in one process.

It composes the very same engine, estimators and Byzantine cohort that the gRPC daemons use, with
every honest worker batched into one estimator instance, so a reproduction grid runs fast and a
seed gives the same trajectory as a deployment.
"""
