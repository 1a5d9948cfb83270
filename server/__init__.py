"""Server side: the round engine (per-worker states, aggregation, step), its gRPC service,
checkpoints and metrics."""
