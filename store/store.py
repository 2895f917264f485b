"""The LightningStore: ClickHouse through clickhouse-connect, embedded (chDB) or a server.

One class serves every caller: the collector inserts columnar span batches, the trainer reads
span trees and publishes checkpoints, the CLI runs users' SQL. Every user value travels as a
server-side query parameter (`{name:Type}`), never spliced into SQL text. ClickHouse's own
errors surface as `InvalidInput` with ClickHouse's message; an unreachable server, and a refusal
that a retry can outlive (memory, disk, too many parts), as `StoreUnavailable`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import clickhouse_connect
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from lightspan.errors import InvalidInput, LightspanError, NotFound, StoreLocked, StoreUnavailable
from lightspan.store import gate, lock, routing
from lightspan.store.compare import VersionComparison, compare_versions
from lightspan.store.schema import (
    LATEST_VERSION,
    MIGRATIONS,
    RESOURCE_ROUTES,
    RESOURCES,
    ROLLOUT_SPANS,
    ROLLOUT_TRACES,
    SCHEMA_VERSION,
    TRACES,
    TRAIN_METRICS,
    SchemaOptions,
    migration_statements,
    schema_version_ddl,
)
from lightspan.store.spans import SPAN_SELECT, TRACE_COLUMNS, row_to_span, spans_to_columns
from lightspan.store.url import StoreURL, parse_store_url
from lightspan.types import PromptTemplate, Resource, Span, SpanTree

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self


@dataclass(slots=True)
class Rows:
    """A query result: column names and row tuples."""

    columns: list[str]
    rows: list[tuple]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


@dataclass(slots=True)
class RolloutSummary:
    """One rollout as `rollouts()` lists it."""

    rollout_id: str
    task_id: str
    attempt: int
    service: str
    resources_id: str
    agents: list[str]
    spans: int
    llm_calls: int
    rewards: int  # reward records: reward spans and scored evaluation events
    final_reward: float | None  # the one training uses: the last marked final, else the last
    last_reward: float | None  # the latest in time, final or not
    start: datetime
    end: datetime
    errors: int
    roots: int  # spans without a parent: a root ends last, so > 0 means the episode has landed


def _traces_naming_one_rollout(where: str = "") -> str:
    """Traces whose spans name exactly one rollout, and that rollout (`MappedTrace`, `MappedRollout`)."""
    return (
        f"SELECT TraceId AS MappedTrace, min(FirstRollout) AS MappedRollout FROM {ROLLOUT_TRACES} {where}"
        " GROUP BY TraceId HAVING MappedRollout = max(LastRollout)"
    )


# `rollouts()` per stored key, then per rollout. A span that names no rollout is stored under its
# trace's id (schema migration 7 says why), so the spans are first summarised per stored
# `RolloutId` (and whether that is the trace's own id), as fast as before traces were resolved;
# only those summaries, one per rollout or trace, are joined to `rollout_traces` and merged into
# the rollout the trace names. Aggregates that do not simply add up travel as -State and -Merge.
_PER_KEY = """SELECT RolloutId, RolloutId = TraceId AS Keyed,
                   anyIfState(TaskId, TaskId != '') AS task, max(Attempt) AS attempt,
                   argMinState(ServiceName, (Timestamp, SpanId)) AS service,
                   argMaxState(ResourcesId, length(ResourcesId)) AS resources,
                   groupUniqArrayIfState(AgentName, AgentName != '') AS agents,
                   count() AS spans, countIf(IsLLMCall) AS llm_calls, sum(RewardCount) AS rewards,
                   argMaxIfState(Reward, (RewardFinal, RewardTime, SpanId), Reward IS NOT NULL) AS final_reward,
                   argMaxIfState(Reward, (RewardTime, SpanId), Reward IS NOT NULL) AS last_reward,
                   min(Timestamp) AS start, max(Timestamp + toIntervalNanosecond(Duration)) AS end,
                   countIf(StatusCode = 'Error') AS errors, countIf(ParentSpanId = '') AS roots
            FROM {table} FINAL
            {scan}
            GROUP BY RolloutId, Keyed"""
_PER_ROLLOUT = """SELECT if(Keyed AND MappedRollout != '', MappedRollout, RolloutId) AS Rollout,
                   anyIfMerge(task) AS task, max(attempt) AS attempt, argMinMerge(service) AS service,
                   argMaxMerge(resources) AS resources, arraySort(groupUniqArrayIfMerge(agents)) AS agents,
                   sum(spans) AS spans, sum(llm_calls) AS llm_calls, sum(rewards) AS rewards,
                   argMaxIfMerge(final_reward) AS final_reward, argMaxIfMerge(last_reward) AS last_reward,
                   min(start) AS start, max(end) AS end, sum(errors) AS errors, sum(roots) AS roots
            FROM ({per_key}) AS keys LEFT ANY JOIN traces ON Keyed AND RolloutId = MappedTrace
            GROUP BY Rollout"""


# The columns `rollouts(where=...)` and `lightspan export --where` filter on, one row per rollout.
ROLLOUT_COLUMNS = (
    "RolloutId",
    "TaskId",
    "Attempt",
    "ServiceName",
    "ResourcesId",
    "AgentNames",
    "Spans",
    "LLMCalls",
    "Rewards",
    "Reward",
    "LastReward",
    "Start",
    "End",
    "Errors",
    "Roots",
)
_ROLLOUT_FILTERS = frozenset(
    {
        "service",
        "agent",
        "task",
        "since",
        "until",
        "resources_id",
        "min_rewards",
        "shard",
        "landed",
        "ended_after",
        "ended_before",
    }
)


def _summary(r: Sequence[Any]) -> RolloutSummary:
    return RolloutSummary(
        rollout_id=r[0],
        task_id=r[1],
        attempt=int(r[2]),
        service=r[3],
        resources_id=r[4],
        agents=list(r[5]),
        spans=int(r[6]),
        llm_calls=int(r[7]),
        rewards=int(r[8]),
        final_reward=r[9],
        last_reward=r[10],
        start=r[11],
        end=r[12],
        errors=int(r[13]),
        roots=int(r[14]),
    )


def _clickhouse_message(error: Exception) -> str:
    """ClickHouse's own words (or the socket's), without the driver's preamble and stack trace."""
    text = str(error)
    errno = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if errno:
        return errno.group(1).strip()
    start = text.find("Code:")
    text = text[start:] if start >= 0 else text
    return text.split("Stack trace")[0].strip().splitlines()[0] if text.strip() else repr(error)


# The embedded engine runs in the process that embeds it, usually on the machine of the apps it
# traces (the embedded default on a laptop, a sidecar): its merges are background work and run at
# this Linux nice value, yielding the CPU to those apps; a collector with a write-ahead log runs
# the inserts nobody waits for so too (`collector.server`). ClickHouse applies it only where the
# process has CAP_SYS_NICE (root, or a container given it), since it resets a thread to 0
# afterwards; elsewhere it is a no-op. chDB takes server settings in its connection string.
BACKGROUND_NICE = 10
EMBEDDED_ENGINE_SETTINGS = {"os_threads_nice_value_merge_mutate": str(BACKGROUND_NICE)}


def embedded_engine(path: str) -> str:
    """chDB's connection string for the embedded store at `path` (resolved), settings included:
    what the store's own client opens, for another handle on the same engine."""
    return f"{path}?{urlencode(EMBEDDED_ENGINE_SETTINGS)}"


# ClickHouse error codes that mean "not now" rather than "not this": the server is short of memory,
# disk or parts headroom, overloaded, read-only for a moment, or lost its Keeper. The same data can
# go in later, so the caller gets StoreUnavailable (a collector answers UNAVAILABLE and the client
# retries) instead of InvalidInput (a collector answers INVALID_ARGUMENT and the client drops it).
_RETRYABLE_CODES = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        225,  # NO_ZOOKEEPER
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        425,  # SYSTEM_ERROR
        439,  # CANNOT_SCHEDULE_TASK
        473,  # DEADLOCK_AVOIDED
        999,  # KEEPER_EXCEPTION
    }
)


def _refusal(error: Exception, url: StoreURL) -> LightspanError:
    """What ClickHouse's refusal means for the caller: retry later, or fix the input."""
    message = _clickhouse_message(error)
    code = re.match(r"Code: (\d+)\.", message)
    if code and int(code.group(1)) in _RETRYABLE_CODES:
        return StoreUnavailable(f"store {url} cannot take it now: {message}")
    return InvalidInput(message)


class Store:
    """A connection to the LightningStore; create with `Store.connect(url)`."""

    def __init__(self, client: Any, url: StoreURL):
        self._client = client
        self.url = url
        self.options = SchemaOptions(cluster=url.cluster, embedded=url.embedded)

    # --- connection -----------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str | None = None, *, migrate: bool = True, connect_timeout: int = 10) -> Store:
        """Open the store the URL names (default: LIGHTSPAN_STORE or ./lightspan-data).

        An embedded directory owned by a running collector is reached through the SQL endpoint
        that collector advertises, so every tool works while it ingests. The schema is created
        or migrated unless `migrate=False`.
        """
        parsed = parse_store_url(url)
        try:
            client = cls._open_client(parsed, connect_timeout)
        except StoreLocked:
            endpoint = lock.read_endpoint(parsed.path) if parsed.path else None
            if endpoint is None:
                raise
            parsed = parse_store_url(endpoint)
            client = cls._open_client(parsed, connect_timeout)
        store = cls(client, parsed)
        if migrate:
            try:
                store.migrate()
            except BaseException:
                store.close()
                raise
        return store

    @staticmethod
    def _open_client(url: StoreURL, connect_timeout: int) -> Any:
        if url.embedded:
            assert url.path is not None
            lock.acquire(url.path)
            try:
                return clickhouse_connect.get_client(
                    dsn=f"chdb://{url.path}", chdb_options=EMBEDDED_ENGINE_SETTINGS
                )
            except Exception as error:  # noqa: BLE001 - whatever chDB raised, the lock must go
                lock.release(url.path)
                raise StoreUnavailable(f"cannot open the embedded store {url.path}: {error}") from None
        try:
            client = clickhouse_connect.get_client(
                host=url.host,
                port=url.port,
                username=url.username,
                password=url.password,
                secure=url.scheme == "https",
                connect_timeout=connect_timeout,
                autogenerate_session_id=False,
            )
        except OperationalError as error:
            raise StoreUnavailable(
                f"cannot reach ClickHouse at {url}: {_clickhouse_message(error)}"
            ) from None
        except DatabaseError as error:
            raise StoreUnavailable(
                f"ClickHouse at {url} refused the connection: {_clickhouse_message(error)}"
            ) from None
        if url.database != "default":
            client.command(f"CREATE DATABASE IF NOT EXISTS `{url.database}`")
            client.database = url.database
        return client

    def close(self) -> None:
        if self._client is None:
            return
        self._client.close()
        self._client = None
        if self.url.embedded and self.url.path is not None:
            lock.release(self.url.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Any:
        """The underlying clickhouse-connect client, for callers that need its full API."""
        if self._client is None:
            raise LightspanError(f"the store {self.url} is closed")
        return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except OperationalError as error:
            raise StoreUnavailable(f"store {self.url} unavailable: {_clickhouse_message(error)}") from None
        except DatabaseError as error:
            raise _refusal(error, self.url) from None

    # --- SQL ------------------------------------------------------------------------------------
    def sql(self, query: str, parameters: Mapping[str, Any] | None = None) -> Rows:
        """Run a query with server-side parameters (`{name:Type}` placeholders)."""
        result = self._call("query", query, parameters=dict(parameters or {}))
        return Rows(list(result.column_names), list(result.result_rows))

    def command(self, statement: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return self._call("command", statement, parameters=dict(parameters or {}))

    # --- schema ---------------------------------------------------------------------------------
    def schema_version(self) -> int:
        # Created only when missing, so a client that may not run DDL (through a collector's
        # SQL endpoint, or a read-only user) can open a migrated store.
        if not self.sql(f"EXISTS TABLE {SCHEMA_VERSION}").scalar():
            self.command(schema_version_ddl(self.options))
        return int(self.sql(f"SELECT max(Version) FROM {SCHEMA_VERSION} FINAL").scalar() or 0)

    def migrate(self) -> list[int]:
        """Apply the migrations this store lacks; returns their numbers (empty when current)."""
        current = self.schema_version()
        applied = []
        for number, description, _ in MIGRATIONS:
            if number <= current:
                continue
            try:
                for statement in migration_statements(number, self.options):
                    self.command(statement)
                self._call(
                    "insert", SCHEMA_VERSION, [[number, description]], column_names=["Version", "Description"]
                )
            except InvalidInput as error:
                # Typically a newer Lightspan reaching a collector that an older one started: the
                # collector's SQL endpoint takes no schema changes, its owner migrates at start.
                raise InvalidInput(
                    f"{self.url} has schema version {current} and this Lightspan needs "
                    f"{LATEST_VERSION}, but migration {number} was refused: {error} "
                    "(a collector serving the store migrates it when it starts: restart it with "
                    "this version of Lightspan, or run `lightspan store migrate` as a user allowed "
                    "to change the schema)"
                ) from None
            applied.append(number)
        return applied

    @property
    def latest_schema_version(self) -> int:
        return LATEST_VERSION

    # --- spans ----------------------------------------------------------------------------------
    def insert_columns(
        self, columns: Sequence[Sequence[Any]], column_names: Sequence[str] = TRACE_COLUMNS
    ) -> int:
        """Insert one columnar batch into `otel_traces`; returns rows.

        The insert returns after ClickHouse committed the batch, materialised views included,
        which is what lets the collector acknowledge only committed spans.
        """
        if not columns or not len(columns[0]):
            return 0
        self._call("insert", TRACES, columns, column_names=list(column_names), column_oriented=True)
        return len(columns[0])

    def insert_native(
        self, blocks: Sequence[bytes], column_names: Sequence[str], settings: Mapping[str, str] | None = None
    ) -> None:
        """Insert Native-format blocks into `otel_traces` as one insert (the collector's path).

        Like `insert_columns` it returns once ClickHouse committed them, views included, and
        raises when ClickHouse refused them. (chDB's streaming insert, `Connection.send_insert`,
        would take the blocks from memory instead of the temporary file clickhouse-connect's chDB
        backend writes, but chDB 4.4 reports success for an insert that ClickHouse refused with
        TOO_MANY_PARTS and stores nothing: a collector would acknowledge lost spans.)
        """
        data = b"".join(blocks)  # one block is returned as it is, not copied
        if data:
            self._call(
                "raw_insert", TRACES, list(column_names), data, settings=dict(settings or {}), fmt="Native"
            )

    def insert_spans(self, spans: Sequence[Span]) -> int:
        """Insert `Span` objects (tests, tools, synthetic data sets)."""
        return self.insert_columns(spans_to_columns(spans))

    def span_rows(self, rollout_ids: Iterable[str], select: str) -> list[tuple]:
        """`(rollout id, *select)` of every span of these rollouts.

        The spans of a rollout are those that name it and the spans of its traces that name no
        rollout (`semconv`'s rollout rule; those are stored under their trace's id). Both are
        found by primary key: the traces these rollouts name first, from `rollout_traces`, then
        the spans stored under the rollouts' ids or those traces' ids. Retried duplicates appear once.
        """
        ids = list(dict.fromkeys(rollout_ids))
        if not ids:
            return []
        traces = dict(
            self.sql(
                _traces_naming_one_rollout(
                    f"WHERE TraceId IN (SELECT TraceId FROM {ROLLOUT_SPANS} WHERE RolloutId IN {{ids:Array(String)}})"
                ),
                {"ids": ids},
            ).rows
        )
        rows = self.sql(
            f"SELECT RolloutId, TraceId, {select} FROM {ROLLOUT_SPANS} FINAL"
            " WHERE RolloutId IN {ids:Array(String)} OR RolloutId IN {traces:Array(String)}",
            {"ids": ids, "traces": list(traces)},
        ).rows
        wanted = set(ids)
        resolved = []
        for row in rows:
            stored, trace = row[0], row[1]
            rollout = traces.get(stored, stored) if stored == trace else stored
            if rollout in wanted:
                resolved.append((rollout, *row[2:]))
        return resolved

    def span_trees(self, rollout_ids: Iterable[str]) -> dict[str, SpanTree]:
        """Span trees of several rollouts in one query (see `span_rows` for which spans)."""
        ids = list(dict.fromkeys(rollout_ids))
        grouped: dict[str, list[Span]] = {}
        for row in self.span_rows(ids, SPAN_SELECT):
            grouped.setdefault(row[0], []).append(row_to_span(row[1:]))
        return {rid: SpanTree(rid, grouped[rid]) for rid in ids if rid in grouped}

    def span_tree(self, rollout_id: str) -> SpanTree:
        """The span tree of one rollout; NotFound when the store has no span of it."""
        tree = self.span_trees([rollout_id]).get(rollout_id)
        if tree is None:
            raise NotFound(f"no rollout {rollout_id!r} in {self.url}")
        return tree

    def rollouts(
        self,
        *,
        service: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        resources_id: str | None = None,
        min_rewards: int = 0,
        shard: tuple[int, int] | None = None,
        landed: bool = False,
        ended_after: datetime | None = None,
        ended_before: datetime | None = None,
        where: str | None = None,
        limit: int | None = 100,
    ) -> list[RolloutSummary]:
        """Rollouts, newest first, filtered; `shard=(rank, world)` keeps the tasks whose id
        hashes to `rank`, so data-parallel ranks split the data by whole task groups (a rollout
        without a task id, as production traffic has, is a group of its own and hashes by its id).
        `landed=True` keeps only rollouts whose root span has arrived (it ends, so it is
        exported, after everything inside it). `ended_after` / `ended_before` bound a rollout's
        end, its latest span's, late rewards included: follow mode trains a rollout only once it
        ended a grace period ago, so user feedback sent minutes later still joins it.
        `where` is a SQL condition over a rollout's columns (`ROLLOUT_COLUMNS`: `Reward` is the
        final reward, `ServiceName` the service of its first span, ...), ClickHouse's message when
        it is not valid SQL. `llm_calls`, `rewards` and `final_reward` follow the rules in
        `lightspan.semconv`, as training reads them (`final_reward` is the reward
        `algorithms.from_spans` gives the rollout before its failure policy)."""
        query, params = self._rollout_query(
            filters={
                "service": service,
                "agent": agent,
                "task": task,
                "since": since,
                "until": until,
                "resources_id": resources_id,
                "min_rewards": min_rewards,
                "shard": shard,
                "landed": landed,
                "ended_after": ended_after,
                "ended_before": ended_before,
            },
            where=where,
            order="Start DESC, RolloutId",
            limit=limit,
        )
        return [_summary(r) for r in self.sql(query, params).rows]

    def iter_rollouts(
        self, *, page: int = 1000, limit: int | None = None, **filters: Any
    ) -> Iterator[RolloutSummary]:
        """Every rollout `rollouts(**filters)` selects, in rollout-id order, `page` keys at a time.

        Keyset pagination on the rollout id, `rollout_spans`' sort key: each page is the range of
        the next `page` stored keys after the previous page's last, found by reading the sort key in
        order, and its query reads that range and the traces its rollouts name, by primary key. So
        every page costs the same however many rollouts come before or after it, a selection of
        millions streams in constant memory on the client, and rows arriving meanwhile never shift
        a page. A page holds fewer rollouts than keys when the filters leave some out, or when a key
        is a trace whose spans join a rollout named elsewhere.
        """
        where = filters.pop("where", None)
        after = ""  # every stored key is longer
        left = limit
        while left is None or left > 0:
            keys, upto = self.sql(
                f"SELECT count(), max(RolloutId) FROM (SELECT DISTINCT RolloutId FROM {ROLLOUT_SPANS}"
                " WHERE RolloutId > {after:String} ORDER BY RolloutId LIMIT {page:UInt64})",
                {"after": after, "page": page},
            ).rows[0]
            if not keys:
                return
            query, params = self._rollout_query(
                filters=filters, where=where, order="RolloutId", limit=left, keys=(after, str(upto))
            )
            rows = self.sql(query, params).rows
            for row in rows:
                yield _summary(row)
            if left is not None:
                left -= len(rows)
            if keys < page:
                return
            after = str(upto)

    def count_rollouts(self, **filters: Any) -> int:
        """How many rollouts `iter_rollouts(**filters)` yields (a progress bar's total)."""
        where = filters.pop("where", None)
        query, params = self._rollout_query(filters=filters, where=where, order=None, limit=None)
        return int(self.sql(f"SELECT count() FROM ({query})", params).scalar() or 0)

    def _rollout_query(
        self,
        *,
        filters: Mapping[str, Any],
        where: str | None,
        order: str | None,
        limit: int | None,
        keys: tuple[str, str] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The summary query behind `rollouts` and `iter_rollouts`: one row per rollout; with `keys`
        (after, upto), only the rollouts whose ids lie in that range of stored keys; sorted by
        `order` unless None (a query that counts or groups them needs no sort)."""
        unknown = set(filters) - _ROLLOUT_FILTERS
        if unknown:
            raise TypeError(f"unknown rollout filters: {sorted(unknown)}")
        having = ["rewards >= {min_rewards:UInt32}"]
        params: dict[str, Any] = {"min_rewards": filters.get("min_rewards", 0)}
        if filters.get("landed"):
            having.append("roots > 0")
        clauses = {
            "service = {service:String}": "service",
            "has(agents, {agent:String})": "agent",
            "task = {task:String}": "task",
            "start >= {since:DateTime64(9)}": "since",
            "start < {until:DateTime64(9)}": "until",
            # every version the filter names ("policy:7"), among others the rollout may record
            "hasAll(splitByChar(',', resources), splitByChar(',', {resources_id:String}))": "resources_id",
            "end > {ended_after:DateTime64(9)}": "ended_after",
            "end <= {ended_before:DateTime64(9)}": "ended_before",
        }
        for clause, name in clauses.items():
            if filters.get(name) is not None:
                having.append(clause)
                params[name] = filters[name]
        if filters.get("shard") is not None:
            rank, world = filters["shard"]
            having.append("cityHash64(if(task != '', task, Rollout)) % {world:UInt32} = {rank:UInt32}")
            params.update(rank=rank, world=world)
        conditions = []
        if where is not None and where.strip():
            conditions.append(f"({where})")
        # A page (`iter_rollouts`) is a range of stored keys: the spans stored under them, and the
        # spans stored under the ids of the traces they are in (the spans of those traces that name
        # no rollout), all read by primary key, as are the traces' mappings.
        scan, traces = "", ""
        if keys is not None:
            in_range = f"SELECT TraceId FROM {ROLLOUT_SPANS} WHERE RolloutId > {{after:String}} AND RolloutId <= {{upto:String}}"
            scan = f"WHERE RolloutId > {{after:String}} AND RolloutId <= {{upto:String}} OR RolloutId IN ({in_range})"
            traces = f"WHERE TraceId IN ({in_range})"
            having.append("Rollout > {after:String} AND Rollout <= {upto:String}")
            params.update(after=keys[0], upto=keys[1])
        # The service of a rollout is its first span's: a late reward sent by another service
        # (a feedback endpoint) joins the rollout without moving it to that service.
        query = f"""
            WITH traces AS ({_traces_naming_one_rollout(traces)})
            SELECT Rollout AS RolloutId, task AS TaskId, attempt AS Attempt, service AS ServiceName,
                   resources AS ResourcesId, agents AS AgentNames, spans AS Spans, llm_calls AS LLMCalls,
                   rewards AS Rewards, final_reward AS Reward, last_reward AS LastReward,
                   start AS Start, end AS End, errors AS Errors, roots AS Roots
            FROM ({_PER_ROLLOUT.format(per_key=_PER_KEY.format(table=ROLLOUT_SPANS, scan=scan))})
            WHERE {" AND ".join(having)}
            {"AND " + " AND ".join(conditions) if conditions else ""}
            {f"ORDER BY {order}" if order else ""}
            {"LIMIT {limit:UInt64}" if limit is not None else ""}"""
        if limit is not None:
            params["limit"] = limit
        return query, params

    # --- resources ------------------------------------------------------------------------------
    def publish_resource(
        self,
        name: str,
        kind: str,
        *,
        uri: str = "",
        content: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> Resource:
        """Append the next version of `name`. Versions are per name and start at 1.

        One publisher per name is assumed (the trainer's rank 0); two concurrent publishers
        could pick the same number, and the later row would replace the earlier.
        """
        if kind not in ("prompt", "checkpoint"):
            raise InvalidInput(f"resource kind must be 'prompt' or 'checkpoint', not {kind!r}")
        if kind == "prompt":
            PromptTemplate(content)  # InvalidInput for a template agents could not fill
        latest = self.latest_resource(name)
        version = (latest.version if latest else 0) + 1
        meta = json.dumps(dict(metadata or {}), default=str)
        self._call(
            "insert",
            RESOURCES,
            [[name, version, kind, uri, content, meta]],
            column_names=["Name", "Version", "Kind", "Uri", "Content", "Metadata"],
        )
        return Resource(name, version, kind, uri, content, json.loads(meta), datetime.now())

    def resources(self, name: str | None = None) -> list[Resource]:
        """Every version of `name` (or of every resource), oldest first."""
        where = "WHERE Name = {name:String}" if name is not None else ""
        rows = self.sql(
            f"SELECT Name, Version, Kind, Uri, Content, Metadata, Created FROM {RESOURCES} FINAL {where}"
            " ORDER BY Name, Version",
            {"name": name} if name is not None else None,
        ).rows
        return [Resource(r[0], int(r[1]), r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6]) for r in rows]

    def latest_resource(self, name: str) -> Resource | None:
        """The highest version of `name`, or None when it was never published."""
        versions = self.resources(name)
        return versions[-1] if versions else None

    def resource(self, name: str, version: int) -> Resource:
        """One version of `name`; NotFound when there is no such name or version."""
        rows = self.sql(
            f"SELECT Name, Version, Kind, Uri, Content, Metadata, Created FROM {RESOURCES} FINAL"
            " WHERE Name = {name:String} AND Version = {version:UInt32}",
            {"name": name, "version": version},
        ).rows
        if not rows:
            known = ", ".join(map(str, self._versions(name)))  # NotFound for an unknown name
            raise NotFound(f"resource {name!r} has no version {version} (versions: {known})")
        r = rows[0]
        return Resource(r[0], int(r[1]), r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6])

    def _versions(self, name: str) -> list[int]:
        """The published versions of `name`, ascending; NotFound for a name never published."""
        versions = [
            int(v)
            for (v,) in self.sql(
                f"SELECT DISTINCT Version FROM {RESOURCES} WHERE Name = {{name:String}} ORDER BY Version",
                {"name": name},
            ).rows
        ]
        if not versions:
            raise NotFound(f"no resource named {name!r} (see `lightspan resources list`)")
        return versions

    # --- routes between resource versions (see store.routing) ------------------------------------
    def route(self, name: str) -> routing.Route:
        """The route of `name` now: its newest route row, else the default (its latest version)."""
        versions = self._versions(name)
        rows = self.sql(
            f"SELECT Seq, Action, Versions, Weights, Promoted, Created FROM {RESOURCE_ROUTES} FINAL"
            " WHERE Name = {name:String} ORDER BY Seq DESC LIMIT 1",
            {"name": name},
        ).rows
        if not rows:
            # The latest version the promotion gate lets through: a candidate that awaits the
            # gate, or failed it, gets no traffic (`store.gate`).
            latest = gate.routable_latest(self, name)
            return routing.default_route(name, [latest.version] if latest else versions[:1])
        seq, action, split_versions, weights, promoted, created = rows[0]
        split = tuple((int(v), float(w)) for v, w in zip(split_versions, weights))
        return routing.Route(name, split, action, int(seq), tuple(int(v) for v in promoted), created)

    def routes(self, name: str) -> list[routing.Route]:
        """Every route row of `name`, oldest first: the record of each change."""
        self._versions(name)
        rows = self.sql(
            f"SELECT Seq, Action, Versions, Weights, Promoted, Created FROM {RESOURCE_ROUTES} FINAL"
            " WHERE Name = {name:String} ORDER BY Seq",
            {"name": name},
        ).rows
        return [
            routing.Route(
                name,
                tuple((int(v), float(w)) for v, w in zip(vs, ws)),
                action,
                int(seq),
                tuple(int(v) for v in promoted),
                created,
            )
            for seq, action, vs, ws, promoted, created in rows
        ]

    def set_route(self, name: str, shares: Sequence[tuple[int, float]]) -> routing.Route:
        """Split traffic: a canary or an A/B test (`routing.with_share`); returns the new route."""
        return self._append_route(routing.with_share(self.route(name), self._versions(name), shares))

    def promote(self, name: str, version: int) -> routing.Route:
        """Send every rollout to `version` of `name`, on the record as a promotion."""
        return self._append_route(routing.promoted(self.route(name), self._versions(name), version))

    def rollback(self, name: str) -> routing.Route:
        """Pin the version promoted before the newest promotion (`store.routing` has the rule)."""
        return self._append_route(routing.rolled_back(self.route(name), self._versions(name)))

    def _append_route(self, route: routing.Route) -> routing.Route:
        """Write one route row. One writer per name is assumed, as for `publish_resource`."""
        self._call(
            "insert",
            RESOURCE_ROUTES,
            [
                [
                    route.name,
                    route.seq,
                    route.action,
                    list(route.versions),
                    [w for _, w in route.split],
                    list(route.promoted),
                ]
            ],
            column_names=["Name", "Seq", "Action", "Versions", "Weights", "Promoted"],
        )
        return route

    def routed(self, name: str) -> Resource | None:
        """The version a request that names no rollout gets (`routing.main_version`), None before
        any version of `name` was published."""
        try:
            route = self.route(name)
        except NotFound:
            return None
        return self.resource(name, routing.main_version(route))

    def resource_for(self, name: str, rollout_id: str) -> Resource:
        """The version of `name` that rollout `rollout_id` uses under the current route."""
        return self.resource(name, routing.choose(self.route(name), rollout_id))

    def compare_versions(self, name: str, *, since: datetime | None = None) -> VersionComparison:
        """Final rewards of the rollouts that ran each version of `name` (`store.compare`).

        A rollout counts for the version of `name` its spans record in `lightspan.resources.id`
        and for its final reward (the one `rollouts()` reports); rollouts without a reward are
        left out. `since` keeps the rollouts that started at or after it.
        """
        route = self.route(name)
        prefix = f"{name}:"
        # The rollouts `rollouts()` reports (a trace's spans join the rollout its root names, late
        # rewards included), each counted for the version of `name` it recorded.
        per_rollout, params = self._rollout_query(
            filters={"since": since},
            where="Reward IS NOT NULL AND position(ResourcesId, {prefix:String}) > 0",
            order=None,
            limit=None,
        )
        element = "arrayFirst(x -> startsWith(x, {prefix:String}), splitByChar(',', ResourcesId))"
        query = f"""
            SELECT toUInt32OrZero(substring({element}, {{offset:UInt32}})) AS version, groupArray(Reward)
            FROM ({per_rollout})
            GROUP BY version HAVING version > 0 ORDER BY version"""
        params.update(prefix=prefix, offset=len(prefix) + 1)
        rewards = {int(v): [float(x) for x in values] for v, values in self.sql(query, params).rows}
        return compare_versions(name, rewards, route.primary)

    # --- training metrics -----------------------------------------------------------------------
    def log_metrics(self, run: str, step: int, metrics: Mapping[str, float]) -> None:
        rows = [[run, step, key, float(value)] for key, value in metrics.items()]
        if rows:
            self._call("insert", TRAIN_METRICS, rows, column_names=["Run", "Step", "Name", "Value"])

    def metrics(self, run: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric of a run as name -> [(step, value)] in step order."""
        rows = self.sql(
            f"SELECT Name, Step, Value FROM {TRAIN_METRICS} WHERE Run = {{run:String}} ORDER BY Name, Step, Time",
            {"run": run},
        ).rows
        series: dict[str, list[tuple[int, float]]] = {}
        for name, step, value in rows:
            series.setdefault(name, []).append((int(step), float(value)))
        return series
