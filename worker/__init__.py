"""Worker side: the honest worker loop, the gRPC client and the Byzantine strategies."""
