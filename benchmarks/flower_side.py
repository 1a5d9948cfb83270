"""The Flower side of `bench_vs_flower.py`: run by the Flower interpreter only, never by byzps.

    FLOWER_PYTHON benchmarks/flower_side.py server --port P --dim D --clients N --rounds R --out F
    FLOWER_PYTHON benchmarks/flower_side.py client --port P --dim D --cid I

The server is Flower's legacy gRPC server (`flwr.server.start_server`, grpc-bidi transport, the
path the issue measured; deprecated since flwr 1.13 but still shipped in 1.42) with FedAvg over
all N clients (every client reports num_examples = 1, so the weighted average is the plain mean)
and no evaluation rounds. Each round it writes one JSON line to F: {"round", "opened" (wall time
when configure_fit began), "closed" (wall time when aggregate_fit returned)}. A client
(`flwr.client.start_client`) does no training: `fit` returns the same fixed float32 vector of
size D every round, as a NumPyClient.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def fixed_vector(dim: int, cid: int) -> np.ndarray:
    return np.random.default_rng(cid).standard_normal(dim, dtype=np.float32)


def serve(args: argparse.Namespace) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    log = open(args.out, "a")  # noqa: SIM115 - closed below, one line flushed per round

    class TimedFedAvg(fl.server.strategy.FedAvg):
        opened = 0.0

        def configure_fit(self, server_round, parameters, client_manager):
            self.opened = time.time()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            line = {
                "round": server_round,
                "opened": self.opened,
                "closed": time.time(),
                "results": len(results),
                "failures": len(failures),
            }
            log.write(json.dumps(line) + "\n")
            log.flush()
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(args.dim, np.float32)]),
    )
    try:
        fl.server.start_server(
            server_address=f"127.0.0.1:{args.port}",
            config=fl.server.ServerConfig(num_rounds=args.rounds, round_timeout=args.round_timeout),
            strategy=strategy,
        )
    finally:
        log.close()


def client(args: argparse.Namespace) -> None:
    import flwr as fl

    vector = fixed_vector(args.dim, args.cid)

    class FixedClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [vector]

        def fit(self, parameters, config):
            return [vector], 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    fl.client.start_client(
        server_address=f"127.0.0.1:{args.port}",
        client=FixedClient().to_client(),
        max_wait_time=args.connect_timeout,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    s = roles.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--dim", type=int, required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--round-timeout", type=float, default=None)
    s.add_argument("--out", required=True)
    c = roles.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--dim", type=int, required=True)
    c.add_argument("--cid", type=int, required=True)
    c.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args()
    serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    main()
