"""modelhost: keeps models resident on one machine and streams their tokens over gRPC."""
