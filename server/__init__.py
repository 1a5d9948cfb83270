"""Server side: the round engine (per-worker states, aggregation, step), its gRPC service,
checkpoints and metrics.

engine.py       RoundEngine: absorb messages, close rounds (transport-free, shared with sim/)
validation.py   checks at the door (validate_update, check_round, SeqLedger)
coordinator.py  the live round state machine: registration, quorum, deadlines, waiters
service.py      the gRPC servicer: protobuf ↔ coordinator, status codes
auth.py         worker tokens (token_for) and id checks
wal.py          write-ahead log of accepted updates and round closes
checkpoint.py   atomic checkpoints + log generations; recovery
results.py      metrics.jsonl / summary.json / params.npy (shared with the simulator)
daemon.py       process lifecycle: recover, serve, health, reflection, signals, linger
"""
