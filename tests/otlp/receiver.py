#!/usr/bin/env python3
"""A tiny OTLP/HTTP collector for Herald's tests: records every span it receives, one JSON line each.

Accepts what `opentelemetry-otlp` sends over HTTP/protobuf:

    POST /v1/traces   body: ExportTraceServiceRequest (protobuf, optionally gzip)
    POST /v1/metrics  accepted and ignored
    POST /v1/logs     accepted and ignored

Each span becomes a line in --out (flushed per request), read back by `herald_tests::otlp`:

    {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "", "name": str,
     "service": resource attribute service.name or "", "kind": int (OTLP SpanKind),
     "start_ns": int, "end_ns": int, "attributes": {key: value as a string},
     "links": [{"trace_id": hex, "span_id": hex}]}

With --tls-cert and --tls-key it serves https (for OTEL_EXPORTER_OTLP_CERTIFICATE), and with
--tls-client-ca too it asks for a client certificate signed by that CA (mutual TLS) and refuses
connections without one.

Prints `listening on PORT` on stdout once it accepts connections (--port 0 picks a free port, so
the caller never races another process for it). Otherwise quiet: no access log; a rejected request
is reported on stderr.

Needs `opentelemetry-proto` (pinned in scripts/requirements.txt, installed by scripts/deps.sh).
"""

import argparse
import gzip
import json
import ssl
import sys
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"
# A request body larger than this is refused rather than buffered (a test exports kilobytes).
MAX_BODY = 64 * 1024 * 1024


def any_value_to_str(value):
    """An attribute value as a string: the way a test compares it, whatever its OTLP type."""
    which = value.WhichOneof("value")
    if which is None:
        return ""
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        # As Rust and the OpenTelemetry specification spell them, not Python's True/False.
        return "true" if value.bool_value else "false"
    if which == "int_value":
        return str(value.int_value)
    if which == "double_value":
        return repr(value.double_value)
    if which == "bytes_value":
        return value.bytes_value.hex()
    if which == "array_value":
        return json.dumps([any_value_to_str(v) for v in value.array_value.values])
    if which == "kvlist_value":
        return json.dumps({kv.key: any_value_to_str(kv.value) for kv in value.kvlist_value.values})
    return str(getattr(value, which))


def attributes_to_dict(attributes):
    return {kv.key: any_value_to_str(kv.value) for kv in attributes}


def span_lines(request):
    """One JSON line (with its newline) per span in an ExportTraceServiceRequest."""
    lines = []
    for resource_spans in request.resource_spans:
        service = attributes_to_dict(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                record = {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "service": service,
                    "kind": int(span.kind),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "attributes": attributes_to_dict(span.attributes),
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links],
                }
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    return lines


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the exporter's HTTP client expects; every response has a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "herald-otlp-receiver"

    # Set on the class by main(): the output file and the lock that keeps lines whole.
    out = None
    out_lock = threading.Lock()

    def log_message(self, format, *args):  # noqa: A002 (the base class names it so)
        pass  # no access log: the caller reads stdout for the port line only

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            body = self.read_body()
            if path == "/v1/traces":
                self.export_traces(body)
                self.reply(HTTPStatus.OK, ExportTraceServiceResponse().SerializeToString())
            elif path == "/v1/metrics":
                self.reply(HTTPStatus.OK, ExportMetricsServiceResponse().SerializeToString())
            elif path == "/v1/logs":
                self.reply(HTTPStatus.OK, ExportLogsServiceResponse().SerializeToString())
            else:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        except BadRequest as e:
            print(f"otlp-receiver: {self.command} {self.path}: {e.status.value} {e}", file=sys.stderr, flush=True)
            self.reply(e.status, str(e).encode(), content_type="text/plain; charset=utf-8")

    def do_GET(self):
        self.reply(HTTPStatus.NOT_FOUND, b"POST OTLP/HTTP protobuf to /v1/traces\n", content_type="text/plain")

    def read_body(self):
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                body = self.read_chunked()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes")
                body = self.rfile.read(length)
        except (BadRequest, ValueError) as e:
            # The rest of the body is unread (or unreadable): this connection cannot carry another request.
            self.close_connection = True
            if isinstance(e, BadRequest):
                raise
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad body framing: {e}") from e
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                return gzip.decompress(body)
            if encoding == "deflate":
                return zlib.decompress(body)
        except (OSError, EOFError, zlib.error) as e:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad {encoding} body: {e}") from e
        if encoding not in ("", "identity"):
            raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding: {encoding}")
        return body

    def read_chunked(self):
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while self.rfile.readline().strip():
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "chunked body too large")
            body += self.rfile.read(size)
            self.rfile.readline()  # the CRLF after each chunk

    def export_traces(self, body):
        content_type = self.headers.get("Content-Type", PROTOBUF).split(";", 1)[0].strip().lower()
        if content_type != PROTOBUF:
            # OTLP/HTTP JSON spells ids in hex where protobuf's JSON mapping uses base64: not worth
            # supporting while Herald exports protobuf.
            raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"only {PROTOBUF} is accepted, not {content_type}")
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as e:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"not an ExportTraceServiceRequest: {e}") from e
        lines = span_lines(request)
        if lines:
            # One write per request under the lock: lines from concurrent exports never interleave,
            # and a reader sees whole lines (it ignores a last line without its newline).
            with self.out_lock:
                self.out.write("".join(lines))
                self.out.flush()

    def reply(self, status, body, content_type=PROTOBUF):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--out", required=True, help="file to append one JSON line per span to")
    parser.add_argument("--tls-cert", help="serve https with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA (PEM)")
    args = parser.parse_args()

    Handler.out = open(args.out, "a", encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.tls_client_ca)
        # A failed handshake raises in accept(), which the server ignores: the client just sees
        # its connection refused.
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        Handler.out.close()


if __name__ == "__main__":
    main()
