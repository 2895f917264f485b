"""OTLP receivers (gRPC and HTTP), decoding to `otel_traces` columns, group commit with
acknowledgement after commit, and the embedded store's SQL endpoint.

Import `lightspan.collector.server.Collector` (or use `lightspan collector`); this package
keeps its top level free of heavy imports so the CLI's `--help` stays fast.
"""
