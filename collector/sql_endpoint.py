"""ClickHouse's HTTP interface for the embedded store this process owns.

chDB lets one process own a data directory; while the collector owns it, this endpoint is how
the trainer, `lightspan sql`, clickhouse-connect, curl or Grafana reach the same data. It speaks
the parts of ClickHouse's HTTP protocol those clients use: the query in the `query` URL
parameter and/or the POST body, `param_<name>` query parameters, settings as URL parameters,
`database`, `default_format`, `/ping`, compressed request bodies (gzip, deflate, br, zstd,
lz4), inserts whose data follows `FORMAT <name>` in the body, and ClickHouse's error shape
(`Code: N. DB::Exception: ...` with `X-ClickHouse-Exception-Code`), so clients raise their usual
errors. What a request may do is `collector.sql_policy`'s: read the store (GET requests, and
the read-only token, only read), write the tables Lightspan writes, reach nothing else, within
per-query time and memory limits.

Each request runs on its own chDB connection handle to the same engine (cheap, and isolated:
per-request settings cannot leak into the next request). There are no server-side sessions,
so a `SET` lasts one request.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import email.utils
import hmac
import json
import os
import re
import tempfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import chdb

from lightspan.collector.httpd import BadBody, BodyTooLarge, Handler, Server
from lightspan.collector.sql_policy import (
    ACCESS_DENIED,
    WRITABLE_TABLES,
    Limits,
    Refused,
    Statement,
    check,
    check_text,
    parse_ast,
    prepare,
)

# URL parameters that steer the HTTP layer rather than being ClickHouse settings.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "http_native_compression_disable_checksumming_on_decompress",
    }
)

_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
}
# Statements that produce a result set (and so a format header), by first keyword.
_RESULT_KEYWORDS = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "VALUES"}
)
_COMMENTS = re.compile(r"\A(?:\s+|(?:--|#)[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)
_FIRST_WORD = re.compile(r"\(*\s*([A-Za-z]+)")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*\Z", re.IGNORECASE)
# An INSERT's data starts after `FORMAT <name>` and one line break (or whitespace), or after VALUES.
_INSERT_DATA = re.compile(rb"\b(?:FORMAT\s+(\w+)[ \t]*(?:\r?\n|\s)?|VALUES\b)", re.IGNORECASE)
# formatQuerySingleLine's error messages name the call; the client sent only its own text.
_IN_SCOPE = re.compile(r": In scope SELECT formatQuerySingleLine\(.*\)\.(?= \(\w+\)\s*\Z)", re.DOTALL)
_CODE = re.compile(r"Code: (\d+)\.")

_BAD_REQUEST_CODES = frozenset(
    {
        6,
        25,
        26,
        27,
        32,
        33,
        34,
        35,
        36,
        38,
        41,
        42,
        43,
        44,
        46,
        47,
        48,
        49,
        51,
        53,
        62,
        69,
        70,
        72,
        73,
        75,
        107,
        108,  # NO_DATA_TO_INSERT
        115,
        117,
        130,
        131,
        179,
        190,
        344,  # SUPPORT_IS_DISABLED: e.g. an expression in an INSERT's VALUES rows
        215,
        352,
        386,
        394,
        403,
        457,
        456,
        472,
        473,
    }
)
# As ClickHouse answers them (HTTP/exceptionCodeToHTTPStatus.cpp), except that refusals (164
# READONLY, 497 ACCESS_DENIED) are 403 rather than ClickHouse's 500.
_HTTP_STATUS = {60: 404, 81: 404, 164: 403, 497: 403, 516: 403, 192: 403, 202: 429, 159: 408, 209: 504}
MEMORY_LIMIT_EXCEEDED = 241

AUTH_FAILED = 516
READ, WRITE = "read", "write"


class ClickHouseError(Exception):
    """An error to answer in ClickHouse's own shape: `Code: N. DB::Exception: message. (NAME)`."""

    def __init__(self, code: int, message: str, name: str = "", *, text: str | None = None):
        super().__init__(text or f"Code: {code}. DB::Exception: {message}. ({name})")
        self.code = code


@dataclass
class SQLApp:
    """The store the endpoint serves and how it authenticates."""

    engine: str  # chDB's connection string for the store's engine (`store.embedded_engine`)
    auth_token: str | None  # reads and writes (Lightspan's own components)
    max_body_bytes: int
    limits: Limits
    read_token: str | None = None  # reads only (dashboards)
    # Waits up to the given seconds for every span acknowledged so far to be in the store (the
    # collector's write-ahead log inserts them in the background), so a query sees them.
    settled: Callable[[float], bool] | None = None
    version: str = ""
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        connection = chdb.connect(self.engine)
        try:
            version, timezone = (
                connection.query("SELECT version(), timezone()", "TabSeparated").bytes().decode().split()
            )
        finally:
            connection.close()
        self.version, self.timezone = version, timezone

    def role(self, headers: Any, params: dict[str, str]) -> str | None:
        """WRITE, READ or None (refused) for the token the request carries: as a bearer token, a
        Basic password (clickhouse-connect's `password=`), an `X-ClickHouse-Key` header or a
        `password` URL parameter. Without any token configured every request is a writer."""
        if not self.auth_token and not self.read_token:
            return WRITE
        candidates = [headers.get("X-ClickHouse-Key"), params.get("password")]
        scheme, _, credentials = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(credentials.strip())
        elif scheme.lower() == "basic":
            try:
                candidates.append(base64.b64decode(credentials.strip()).decode().partition(":")[2])
            except ValueError:
                pass
        for role, token in ((WRITE, self.auth_token), (READ, self.read_token)):
            if token and any(
                c is not None and hmac.compare_digest(c.encode(), token.encode()) for c in candidates
            ):
                return role
        return None


def _first_keyword(sql: str) -> str:
    comments = _COMMENTS.match(sql)  # matches at least the empty string, never None
    match = _FIRST_WORD.match(sql, comments.end() if comments else 0)
    return match.group(1).upper() if match else ""


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 31)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        if encoding == "lz4":
            import lz4.frame  # type: ignore[import-untyped]  # lz4 ships no type information

            return lz4.frame.decompress(body)
        if encoding == "br":
            import brotli  # type: ignore[import-not-found]

            return brotli.decompress(body)
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001 - each codec raises its own error type
        raise ClickHouseError(
            271, f"Cannot decompress {encoding} request body: {error}", "CANNOT_DECOMPRESS"
        ) from None
    raise ClickHouseError(271, f"Unknown Content-Encoding {encoding!r}", "CANNOT_DECOMPRESS")


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a multipart/form-data body: clients send `query` and `param_*` this way
    when the parameters would make the URL too long (clickhouse-connect does, past a few KiB)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    if not message.is_multipart():
        raise ClickHouseError(62, "malformed multipart/form-data body", "SYNTAX_ERROR")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, tuple):  # an RFC 2231 encoded name: (charset, language, text)
            name = email.utils.collapse_rfc2231_value(name)
        if part.get_filename() is not None:
            raise ClickHouseError(48, "external data (file parts) is not supported here", "NOT_IMPLEMENTED")
        if name:
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):  # a nested multipart has no payload of its own
                raise ClickHouseError(62, f"form field {name!r} is not a plain value", "SYNTAX_ERROR")
            fields[name] = payload.decode("utf-8")
    return fields


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class SQLHandler(Handler):
    server: Server

    @property
    def app(self) -> SQLApp:
        return self.server.app

    def do_HEAD(self) -> None:
        self.reply(200, b"Ok.\n")

    def do_GET(self) -> None:
        with self.server.active():
            self._handle(post=False)

    def do_POST(self) -> None:
        with self.server.active():
            self._handle(post=True)

    def _handle(self, post: bool) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if url.path in ("/ping", "/replicas_status") or (
            url.path == "/" and not post and "query" not in params
        ):
            self.reply(200, b"Ok.\n")
            return
        if url.path not in ("/", ""):
            self._error(ClickHouseError(0, f"There is no handle {url.path}", "UNKNOWN_HANDLER"), 404)
            return
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            role = self.app.role(self.headers, params)
            if role is None:
                self.close_connection = True  # the unread body must not be taken for the next request
                raise ClickHouseError(
                    AUTH_FAILED,
                    "default: Authentication failed: password is incorrect, or there is no user "
                    "with such name",
                    "AUTHENTICATION_FAILED",
                )
            body = b""
            if post:
                try:
                    body = self.read_body(self.app.max_body_bytes)
                except BodyTooLarge as error:
                    self.close_connection = True
                    raise ClickHouseError(307, str(error), "TOO_LARGE_STRING_SIZE") from None
                except BadBody as error:
                    self.close_connection = True
                    raise ClickHouseError(33, str(error), "CANNOT_READ_ALL_DATA") from None
                if params.get("decompress") == "1":
                    raise ClickHouseError(
                        48,
                        "ClickHouse-native request compression (decompress=1) is not supported here; "
                        "use Content-Encoding",
                        "NOT_IMPLEMENTED",
                    )
                body = _decompress(body, self.headers.get("Content-Encoding", ""))
                if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
                    params.update(_form_fields(self.headers["Content-Type"], body))
                    body = b""
            if self.app.settled is not None:
                self.app.settled(self.app.limits.seconds)
            # GET requests only read, as on ClickHouse.
            self._execute(params, body, role if post else READ, query_id=query_id)
        except ClickHouseError as error:
            self._error(error, query_id=query_id)

    def _execute(self, params: dict[str, str], body: bytes, role: str, query_id: str) -> None:
        query = params.get("query", "")
        data: bytes | None = None
        fmt: str | None = None
        if _first_keyword(query or body[:4096].decode("utf-8", "replace")) == "INSERT":
            text, fmt, data = self._split_insert(query, body)
        else:
            try:
                text = f"{query}\n{body.decode()}" if query and body else (query or body.decode())
            except UnicodeDecodeError:
                raise ClickHouseError(62, "query is not valid UTF-8", "SYNTAX_ERROR") from None
        if not text.strip():
            raise ClickHouseError(62, "Empty query", "SYNTAX_ERROR")
        default_format = params.get("default_format", "TabSeparated")
        bind = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {
            k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")
        }
        database = params.get("database")
        handles = [chdb.connect(self.app.engine)]
        infile = None
        try:
            # The guard handle: readonly mode, where ClickHouse judges what the checks let through.
            run = self._runner(handles[0])
            statement = self._check(run, text, database, settings, bind)
            insert = statement.insert_table is not None and data is not None
            if data is not None and not insert:
                raise ClickHouseError(
                    ACCESS_DENIED,
                    "the SQL endpoint takes rows (FORMAT <name> or VALUES) into "
                    f"{', '.join(sorted(WRITABLE_TABLES))} only, with no SETTINGS clause",
                    "ACCESS_DENIED",
                )
            if insert and statement.canonical.rsplit(" FORMAT ", 1)[-1] != fmt:
                raise ClickHouseError(
                    62, "the INSERT's rows must follow FORMAT <name> or VALUES", "SYNTAX_ERROR"
                )
            sql = statement.canonical
            if role == WRITE and (insert or statement.plain_read):
                handles.append(chdb.connect(self.app.engine))
                run = self._runner(handles[1])
                prepare(run, database, settings, self.app.limits, readonly=False, quote=_quote)
            if insert:  # a reader's runs on the guard handle, where ClickHouse refuses it
                assert data is not None
                with tempfile.NamedTemporaryFile(
                    prefix="lightspan-sql-", suffix=".data", delete=False
                ) as handle:
                    handle.write(data)
                    infile = handle.name
                sql = f"{sql.rsplit(' FORMAT ', 1)[0]} FROM INFILE {_quote(infile)} FORMAT {fmt}"
            result = run(sql, default_format, bind)
        finally:
            for connection in handles:
                connection.close()
            if infile:
                os.unlink(infile)
        self._answer(statement.canonical, insert and role == WRITE, result, default_format, query_id)

    def _check(
        self, run: Any, text: str, database: str | None, settings: dict[str, str], bind: dict[str, str]
    ) -> Statement:
        """Set up the guard handle and check the statement there (see collector.sql_policy)."""
        try:
            prepare(run, database, settings, self.app.limits, readonly=True, quote=_quote)
            try:
                canonical = run(f"SELECT formatQuerySingleLine({_quote(text)})", "RawBLOB").bytes().decode()
            except ClickHouseError as error:
                raise ClickHouseError(error.code, "", text=_IN_SCOPE.sub("", str(error))) from None
            check_text(canonical)
            tree = run(f"EXPLAIN AST {canonical}", "TabSeparated", bind).bytes().decode()
            return check(parse_ast(tree.split("\n")), canonical)
        except Refused as refusal:
            raise ClickHouseError(refusal.code, str(refusal), refusal.name) from None

    @staticmethod
    def _runner(connection: Any) -> Any:
        def run(sql: str, fmt: str = "TabSeparated", bind: dict[str, str] | None = None) -> Any:
            try:
                return connection.query(sql, fmt, params=bind or {})
            except Exception as error:  # noqa: BLE001 - chDB raises RuntimeError subclasses
                text = str(error).strip()
                match = _CODE.search(text)
                code = int(match.group(1)) if match else 1001
                start = text.find("Code:")
                raise ClickHouseError(
                    code, text, "STD_EXCEPTION", text=text[start:] if start >= 0 else None
                ) from None

        return run

    @staticmethod
    def _split_insert(query: str, body: bytes) -> tuple[str, str | None, bytes | None]:
        """(statement ending `FORMAT <name>`, format, rows) for an INSERT whose rows follow
        `FORMAT <name>` or `VALUES` (rows after VALUES are the Values format); (text, None, None)
        for one without rows. The rows never run as SQL."""
        head = query.encode()
        match = _INSERT_DATA.search(head) if query else None
        if match is not None and not head[match.end() :].strip():
            start, rows = match.start(), body  # the usual split: statement in the URL, rows in the body
        else:
            head = head + b"\n" + body if query and body else (head or body)
            match = _INSERT_DATA.search(head, 0, 65536)
            start, rows = (match.start(), head[match.end() :]) if match else (0, b"")
        try:
            if match is None:
                return head.decode(), None, None
            fmt = match.group(1).decode() if match.group(1) else "Values"
            return f"{head[:start].decode().rstrip()} FORMAT {fmt}", fmt, rows
        except UnicodeDecodeError:
            raise ClickHouseError(62, "the INSERT statement is not valid UTF-8", "SYNTAX_ERROR") from None

    def _answer(
        self, statement: str, was_insert: bool, result: Any, default_format: str, query_id: str
    ) -> None:
        payload = result.bytes() or b""
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.app.timezone,
            "X-ClickHouse-Server-Display-Name": "lightspan",
            "X-ClickHouse-Summary": json.dumps(
                {
                    "read_rows": str(0 if was_insert else result.rows_read()),
                    "read_bytes": str(0 if was_insert else result.bytes_read()),
                    "written_rows": str(result.rows_read() if was_insert else 0),
                    "written_bytes": str(result.bytes_read() if was_insert else 0),
                    "total_rows_to_read": "0",
                    "result_rows": "0",
                    "result_bytes": "0",
                    "elapsed_ns": str(int(result.elapsed() * 1e9)),
                }
            ),
        }
        content_type = "text/plain; charset=UTF-8"
        if not was_insert and _first_keyword(statement) in _RESULT_KEYWORDS:
            match = _TRAILING_FORMAT.search(statement)
            fmt = match.group(1) if match else default_format
            headers["X-ClickHouse-Format"] = fmt
            content_type = _CONTENT_TYPES.get(fmt, "application/octet-stream")
        self.reply(200, payload, content_type, headers)

    def _error(self, error: ClickHouseError, status: int | None = None, query_id: str = "") -> None:
        code = error.code
        text = str(error)
        if status is None:
            status = _HTTP_STATUS.get(code, 400 if code in _BAD_REQUEST_CODES else 500)
            if code == MEMORY_LIMIT_EXCEEDED and "Query memory limit exceeded" in text:
                status = 400  # this query's own limit, not the engine running short
        if "(version" not in text:
            text = f"{text} (version {self.app.version} (lightspan))"
        headers = {"X-ClickHouse-Exception-Code": str(code)}
        if query_id:
            headers["X-ClickHouse-Query-Id"] = query_id
        self.reply(
            status, (text + "\n").encode(), "text/plain; charset=UTF-8", headers, close=self.close_connection
        )
