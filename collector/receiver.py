"""What both OTLP transports do with a request body: decode, queue, wait for the commit.

The gRPC and HTTP servers only translate between their protocol and this: an
`InvalidInput` becomes INVALID_ARGUMENT / 400, a `StoreUnavailable` (store down, queue full,
shutting down) UNAVAILABLE / 503 with retry advice, and a returned `Decoded` the
ExportTraceServiceResponse, with `partial_success` when spans were rejected.
"""

from __future__ import annotations

import hmac
from contextlib import AbstractContextManager

from lightspan.collector.batcher import GroupCommitter, QueueFull
from lightspan.collector.decoders import JSON, PROTOBUF, Decoders
from lightspan.collector.metrics import Metrics
from lightspan.collector.native import Decoded
from lightspan.errors import InvalidInput, StoreUnavailable

__all__ = ["JSON", "PROTOBUF", "Receiver"]


class Receiver:
    """Turns export request bodies into committed spans, counting everything it does."""

    def __init__(
        self,
        committer: GroupCommitter,
        metrics: Metrics,
        *,
        auth_token: str | None = None,
        decoders: Decoders | None = None,
    ):
        self.committer = committer
        self.metrics = metrics
        self.decoders = decoders or Decoders(0)
        self._token = auth_token.encode() if auth_token else None

    def authorized(self, header: str | None) -> bool:
        """Whether an `authorization` header value carries the configured bearer token."""
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, credentials = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    def admit(self, nbytes: int, protocol: str) -> AbstractContextManager[None]:
        """Reserve memory for a request of `nbytes` before reading or decoding it (QueueFull when busy)."""
        try:
            return self.committer.admit(nbytes)
        except StoreUnavailable as error:
            self.count(protocol, "queue_full" if isinstance(error, QueueFull) else "unavailable")
            raise

    def export(self, body: bytes, encoding: str, protocol: str) -> Decoded:
        """Decode, queue and wait until committed; raises InvalidInput or StoreUnavailable."""
        try:
            decoded = self.decoders.decode(body, encoding)
        except InvalidInput:
            self.count(protocol, "invalid")
            raise
        metrics = self.metrics
        metrics.spans_received.labels(protocol=protocol).inc(decoded.spans + decoded.rejected)
        if decoded.rejected:
            metrics.spans_rejected.labels(reason="invalid_span").inc(decoded.rejected)
        if decoded.spans:
            try:
                self.committer.submit(decoded.block, decoded.spans).result()
            except StoreUnavailable as error:
                reason = "queue_full" if isinstance(error, QueueFull) else "unavailable"
                metrics.spans_rejected.labels(reason=reason).inc(decoded.spans)
                self.count(protocol, reason)
                raise
            except InvalidInput:
                metrics.spans_rejected.labels(reason="store_refused").inc(decoded.spans)
                self.count(protocol, "invalid")
                raise
        self.count(protocol, "partial" if decoded.rejected else "ok")
        return decoded

    def count(self, protocol: str, outcome: str) -> None:
        self.metrics.requests.labels(protocol=protocol, outcome=outcome).inc()
