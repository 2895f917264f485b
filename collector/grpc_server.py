"""OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on grpcio.

The method is registered through a generic handler that receives the raw request bytes rather
than through the generated servicer's deserializer: grpcio answers a request its deserializer
cannot parse with INTERNAL, while OTLP requires INVALID_ARGUMENT for malformed data, and the raw
size is what the memory bound admits. The response is the generated ExportTraceServiceResponse.
gzip is handled by grpcio; the size limit is grpcio's max_receive_message_length, which answers
RESOURCE_EXHAUSTED. Retryable failures carry RetryInfo both in `grpc-status-details-bin`
(google.rpc.Status, read by Go exporters) and `google.rpc.retryinfo-bin` (read by the Python SDK).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lightspan.collector.batcher import QueueFull
from lightspan.collector.decode import response
from lightspan.collector.receiver import PROTOBUF, Receiver
from lightspan.errors import InvalidInput, StoreUnavailable

SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
METHOD = "Export"


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, bytes], ...]


class _AbortStatus(_Status, grpc.Status):
    """A grpc.Status for `context.abort_with_status` (grpcio-status is not needed for this)."""


def unavailable_status(message: str, retry_after: float) -> _AbortStatus:
    """UNAVAILABLE with RetryInfo, which OTLP exporters honour as their backoff."""
    seconds = int(retry_after)
    delay = Duration(seconds=seconds, nanos=int((retry_after - seconds) * 1e9))
    retry_info = error_details_pb2.RetryInfo(retry_delay=delay)
    detail = AnyProto()
    detail.Pack(retry_info)
    rich = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail])
    return _AbortStatus(
        grpc.StatusCode.UNAVAILABLE,
        message,
        (
            ("grpc-status-details-bin", rich.SerializeToString()),
            ("google.rpc.retryinfo-bin", retry_info.SerializeToString()),
        ),
    )


class OTLPGrpcServer:
    """The OTLP/gRPC receiver; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        receiver: Receiver,
        *,
        host: str = "127.0.0.1",
        port: int = 4317,
        max_request_bytes: int = 64 << 20,
        workers: int = 128,
        tls: tuple[bytes, bytes] | None = None,
    ):
        # One handler thread per request in flight, most of them waiting for their batch's
        # commit. 128 let SDK clients (512 spans a request) keep two full batches in flight,
        # one filling while the other commits; 32 capped them at 16,384 spans, half a batch,
        # which kept batches small and the store's merges busy. The committer's byte budget
        # bounds what is queued; a body is read before it is admitted, so the handler count
        # also bounds the bytes being read.
        self.receiver = receiver
        self.retry_after = receiver.committer.retry_after
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightspan-grpc"),
            options=[
                ("grpc.max_receive_message_length", max_request_bytes),
                ("grpc.max_send_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        handler = grpc.unary_unary_rpc_method_handler(
            self._export, response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )
        address = f"{host}:{port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind OTLP/gRPC on {address}")

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> Any:
        """Refuse new RPCs; in-flight ones get `grace` seconds. Returns an event set when done."""
        return self._server.stop(grace)

    def _export(
        self, body: bytes, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        receiver = self.receiver
        if not receiver.authorized(dict(context.invocation_metadata()).get("authorization")):
            receiver.count("grpc", "unauthenticated")
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in the authorization metadata"
            )
        try:
            with receiver.admit(len(body), "grpc"):
                decoded = receiver.export(body, PROTOBUF, "grpc")
        except InvalidInput as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StoreUnavailable as error:
            retry_after = error.retry_after if isinstance(error, QueueFull) else self.retry_after
            context.abort_with_status(unavailable_status(str(error), retry_after))
        return response(decoded)
