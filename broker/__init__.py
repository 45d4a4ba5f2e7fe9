"""Camera broker: per-device X.509 certificates and mutual-TLS identity over gRPC."""

__version__ = "0.1.0"
