"""OTLP receivers (gRPC and HTTP), decoding into `otel_traces` Native blocks (in decoder
processes), group commit with acknowledgement after commit, and the embedded store's SQL endpoint.

Import `lightspan.collector.server.Collector` (or use `lightspan collector`); this package
keeps its top level free of heavy imports so the CLI's `--help` stays fast.
"""
