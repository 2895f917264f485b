"""What a request to the SQL endpoint may do: read the store, and write only what Lightspan writes.

The endpoint serves an embedded ClickHouse (chDB) whose one user may do anything, including
reading and writing the host's files (`file()`, `INTO OUTFILE`), reaching the network (`url()`,
`remote()`, `s3()`, `mysql()`...) and running programs (`executable()`). So every statement is
checked before it runs, with ClickHouse's own tools rather than a SQL parser of ours:

1. `formatQuerySingleLine` parses the text: a syntax error, or a second statement after `;`,
   is ClickHouse's SYNTAX_ERROR. What runs afterwards is this canonical text, never the client's,
   so what was checked is what runs (chDB would run every statement of a multi-statement text,
   and the data after an INSERT's `VALUES` is not SQL to run).
2. A canonical text that names `OUTFILE` or `INFILE` anywhere is refused before anything else
   runs: the client part of chDB acts on these clauses, even where one binds to an `EXPLAIN`
   wrapped around the statement (`EXPLAIN AST INSERT ... SELECT 1 INTO OUTFILE 'f'` writes f).
   `EXPLAIN AST` of the canonical text then gives the statement's tree. Table functions outside
   `TABLE_FUNCTIONS`, the `file()` function, `INTO OUTFILE`, `FROM INFILE`, `BACKUP`, `RESTORE`
   and `KILL` are refused here, as ClickHouse's ACCESS_DENIED: ClickHouse's readonly mode lets
   `file()`, `INTO OUTFILE`, `DESCRIBE url(...)` (whose schema inference fetches the URL),
   `merge()` and `KILL QUERY` through. So are rows sent for a table outside `WRITABLE_TABLES`
   (the endpoint, sql_endpoint, refuses them before they run).
3. Everything else runs in ClickHouse's readonly mode (`readonly=1`): DDL, `ALTER`, `SYSTEM`,
   `SET`, `SETTINGS` clauses that change a setting and writes are refused by ClickHouse itself,
   with its own message (READONLY). The exceptions run without readonly, for the writer only:
   an INSERT of data (`FORMAT <name>` or `VALUES`, rows sent as data, never as SQL) into one of
   `WRITABLE_TABLES`, and plain SELECT/DESCRIBE, so that clients see in `system.settings` which
   settings they may send (clickhouse-connect reads it and otherwise drops, or refuses, its
   insert settings).

Settings sent as URL parameters: those in `CHANGEABLE_SETTINGS` apply (a limit only downwards),
every other one is applied after `readonly=1`, where ClickHouse refuses a change. The limits
(`max_execution_time`, `max_memory_usage`) apply to every statement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightspan.store.schema import RESOURCE_ROUTES, RESOURCES, TRACES, TRAIN_METRICS

# Tables a writer may insert into: spans (a collector writing through another collector's SQL
# endpoint, tools that load spans into a store a collector owns), checkpoints and prompts
# (`Store.publish_resource`) and training metrics (`Store.log_metrics`).
WRITABLE_TABLES = frozenset({TRACES, RESOURCES, RESOURCE_ROUTES, TRAIN_METRICS})
# Table functions that compute rows and reach nothing outside the engine.
TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "generate_series",
        "generateSeries",
        "generateRandom",
        "values",
        "view",
        "null",
    }
)
# Scalar functions that read the host's files (ClickHouse's `file(path)` returns a file's bytes).
HOST_FUNCTIONS = frozenset({"file"})
# The database the store lives in (the endpoint's URL is /default).
STORE_DATABASE = "default"

# URL-parameter settings applied before readonly mode: limits (lowered, never raised: Grafana sets
# max_execution_time on every query) and settings Lightspan's own clients send. None reaches
# outside the engine or names a file.
LIMIT_SETTINGS = ("max_execution_time", "max_memory_usage")
CHANGEABLE_SETTINGS = frozenset(
    {
        *LIMIT_SETTINGS,
        # clickhouse-connect's defaults, and the collector's insert settings (collector.server)
        "date_time_input_format",
        "cast_string_to_dynamic_use_inference",
        "cancel_http_readonly_queries_on_client_close",
        "optimize_on_insert",
        "input_format_native_allow_types_conversion",
        # how results are written
        "output_format_json_quote_64bit_integers",
        "output_format_arrow_string_as_string",
        "date_time_output_format",
    }
)
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Statements a writer runs outside readonly mode when they pass the checks (see the docstring).
_PLAIN_READS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery", "DescribeQuery"})
ACCESS_DENIED = 497
# Statements whose condition is a child of the root (DELETE FROM t WHERE 1): a literal there is
# not a file name. (Neither is a query with output, so none has INTO OUTFILE.)
_WHERE_AT_TOP = frozenset({"DeleteQuery", "UpdateQuery"})


@dataclass(frozen=True)
class Limits:
    """Per-query limits: seconds of execution and bytes of memory."""

    seconds: float
    memory_bytes: int

    def values(self, requested: Mapping[str, str]) -> dict[str, str]:
        """The limit settings to apply: the client's where it asks for less, else ours."""
        ours = {"max_execution_time": self.seconds, "max_memory_usage": float(self.memory_bytes)}
        chosen: dict[str, str] = {}
        for name, limit in ours.items():
            asked = _number(requested.get(name))
            value = asked if asked is not None and 0 < asked < limit else limit
            chosen[name] = f"{value:g}" if name == "max_execution_time" else str(int(value))
        return chosen


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


class Refused(Exception):
    """A statement the endpoint does not run: (ClickHouse error code, message, error name)."""

    def __init__(self, message: str, code: int = ACCESS_DENIED, name: str = "ACCESS_DENIED"):
        super().__init__(message)
        self.code, self.name = code, name


@dataclass(frozen=True)
class Node:
    kind: str
    name: str
    depth: int
    parent: str  # the parent node's kind ("" for the root)


def parse_ast(lines: list[str]) -> list[Node]:
    """`EXPLAIN AST` output (one node a line, one space of indent a level) as nodes."""
    nodes: list[Node] = []
    stack: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        kind, _, rest = line.strip().partition(" ")
        name = rest.split(" (", 1)[0].strip()
        del stack[depth:]
        nodes.append(Node(kind, name, depth, stack[-1] if stack else ""))
        stack.append(kind)
    return nodes


@dataclass(frozen=True)
class Statement:
    """A checked statement: its canonical text, kind (the AST root) and what it may do."""

    canonical: str
    kind: str
    insert_table: str | None  # the target of a data-only INSERT into a store table, else None
    has_settings: bool  # a SETTINGS clause

    @property
    def plain_read(self) -> bool:
        return self.kind in _PLAIN_READS and not self.has_settings


_FILE_CLAUSE = re.compile(r"\b(?:INTO\s+OUTFILE|FROM\s+INFILE|OUTFILE|INFILE)\b", re.IGNORECASE)


def check_text(canonical: str) -> None:
    """Refuse a statement whose text names a file clause (a string that merely contains the word
    is refused too: nothing runs, not even EXPLAIN, on a text that might write a file)."""
    if _FILE_CLAUSE.search(canonical):
        raise Refused(
            "INTO OUTFILE and FROM INFILE reach the host's files; the SQL endpoint serves the store"
        )


def check(nodes: list[Node], canonical: str) -> Statement:
    """Refuse what reaches beyond the store; classify the rest (see the module docstring)."""
    if not nodes:
        raise Refused("the statement has no syntax tree", 62, "SYNTAX_ERROR")
    root = nodes[0].kind
    if root.startswith("Kill"):
        raise Refused("KILL is not allowed on the SQL endpoint: queries stop at their time limit")
    if root in ("BackupQuery", "RestoreQuery"):
        raise Refused("BACKUP and RESTORE write and read files outside the store's tables")
    for node in nodes:
        if node.kind == "Function":
            table_function = node.parent in ("TableExpression", "InsertQuery")
            if table_function and node.name not in TABLE_FUNCTIONS:
                raise Refused(
                    f"table function {node.name}() reaches beyond the store; the SQL endpoint allows "
                    f"{', '.join(sorted(TABLE_FUNCTIONS))}"
                )
            if not table_function and node.name in HOST_FUNCTIONS:
                raise Refused(
                    f"function {node.name}() reads the host's files; the SQL endpoint serves the store"
                )
        elif node.kind == "Literal" and node.depth == 1 and root not in _WHERE_AT_TOP:
            # A query's only literal children are its INTO OUTFILE (and COMPRESSION) or an
            # INSERT's FROM INFILE: both name the host's files.
            raise Refused(
                "INTO OUTFILE and FROM INFILE reach the host's files; the SQL endpoint serves the store"
            )
    return Statement(canonical, root, _insert_table(nodes), any(n.kind == "Set" for n in nodes))


def _insert_table(nodes: list[Node]) -> str | None:
    """The table of `INSERT INTO [default.]table [(columns)]` with nothing else (no SELECT, no
    SETTINGS, no function), when it is one of WRITABLE_TABLES."""
    if nodes[0].kind != "InsertQuery":
        return None
    top = [n for n in nodes if n.depth == 1]
    names = [n.name for n in top if n.kind == "Identifier"]
    columns = [n for n in top if n.kind == "ExpressionList"]
    if len(names) + len(columns) != len(top) or len(columns) > 1 or not 1 <= len(names) <= 2:
        return None
    if any(n.depth > 2 or (n.depth == 2 and n.kind != "Identifier") for n in nodes[1:]):
        return None
    if len(names) == 2 and names[0] != STORE_DATABASE:
        return None
    return names[-1] if names[-1] in WRITABLE_TABLES else None


def split_settings(params: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """URL-parameter settings as (changeable before readonly mode, for ClickHouse to judge after)."""
    changeable: dict[str, str] = {}
    judged: dict[str, str] = {}
    for name, value in params.items():
        if not _SETTING_NAME.fullmatch(name):
            raise Refused(f"Unknown setting '{name}'", 115, "UNKNOWN_SETTING")
        (changeable if name in CHANGEABLE_SETTINGS else judged)[name] = value
    return changeable, judged


def prepare(
    run: Callable[..., Any],
    database: str | None,
    settings: Mapping[str, str],
    limits: Limits,
    *,
    readonly: bool,
    quote: Callable[[str], str],
) -> None:
    """Set up a chDB connection handle: database, changeable settings, limits, then (for the
    guard handle) readonly mode and the client's other settings, which ClickHouse judges."""
    if database:
        run(f"USE `{database.replace('`', '')}`")
    changeable, judged = split_settings(settings)
    for name, value in {**changeable, **limits.values(changeable)}.items():
        run(f"SET {name} = {quote(value)}")
    if readonly:
        run("SET readonly = 1")
        for name, value in judged.items():
            run(f"SET {name} = {quote(value)}")
    else:
        # An INSERT's VALUES rows are data: expressions in them (subqueries, functions) are refused.
        run("SET input_format_values_interpret_expressions = 0")
        run("SET input_format_values_deduce_templates_of_expressions = 0")
