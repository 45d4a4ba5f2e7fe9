"""gRPC transport: listeners, the identity interceptor and thin per-service handlers."""
