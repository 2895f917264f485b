"""ClickHouse schema of the LightningStore, as numbered, idempotent migrations.

`otel_traces` (and its trace-id lookup) is column for column the table the OpenTelemetry Collector
contrib ClickHouse exporter creates, so that exporter and Grafana's ClickHouse trace views work on
the same data. Everything Lightspan adds hangs off it: a materialised view lands each span in
`rollout_spans`, keyed by rollout, with typed columns for what training needs; retried duplicates
of a span share a sorting key there and collapse (ReplacingMergeTree, read with FINAL). The
columns that apply a rule (`IsLLMCall`, `AgentName`, the reward columns) are generated from the
rules' data in `lightspan.semconv`, the same data `algorithms` evaluates in Python.

With a cluster name every statement gets `ON CLUSTER`, tables become `<name>_local` with
Replicated engines, and a Distributed table under the plain name fans reads and writes out, so
queries and the stock exporter keep using the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightspan import semconv

TRACES = "otel_traces"
TRACE_ID_TS = "otel_traces_trace_id_ts"
ROLLOUT_SPANS = "rollout_spans"
ROLLOUT_TRACES = "rollout_traces"
RESOURCES = "resources"
RESOURCE_ROUTES = "resource_routes"
TRAIN_METRICS = "train_metrics"
SCHEMA_VERSION = "schema_version"


@dataclass(frozen=True)
class SchemaOptions:
    """Knobs that change the DDL: a cluster for replicated deployments, an optional TTL, and
    whether the store is the embedded chDB one (settings verified only there, migration 9)."""

    cluster: str | None = None
    ttl_days: int | None = None
    embedded: bool = False


def _attr(key: str) -> str:
    return f"SpanAttributes['{key}']"


# Rollout identity: the explicit attribute when present, else the trace. Migrations 1, 2, 4 and 6
# shipped this expression; migration 7 writes `_OWN_ROLLOUT_ID`, `semconv`'s rule.
_ROLLOUT_ID = f"if({_attr(semconv.ROLLOUT_ID)} != '', {_attr(semconv.ROLLOUT_ID)}, TraceId)"


def _resource_attr(key: str) -> str:
    return f"ResourceAttributes['{key}']"


# `semconv.own_rollout_id` as SQL: the rollout a span names itself, else ''.
_AGL_ROLLOUT = _resource_attr(semconv.AGL_ROLLOUT_ID)
_AGL_ATTEMPT = _resource_attr(semconv.AGL_ATTEMPT_ID)
_OWN_ROLLOUT_ID = (
    f"multiIf({_attr(semconv.ROLLOUT_ID)} != '', {_attr(semconv.ROLLOUT_ID)},"
    f" {_AGL_ROLLOUT} != '' AND {_AGL_ATTEMPT} != '',"
    f" concat({_AGL_ROLLOUT}, '{semconv.ROLLOUT_ATTEMPT_SEPARATOR}', {_AGL_ATTEMPT}), {_AGL_ROLLOUT})"
)
# A span's stored RolloutId: its own, else its trace's id (the read resolves it to the trace's rollout).
_STORED_ROLLOUT_ID = f"if(({_OWN_ROLLOUT_ID}) AS _own != '', _own, TraceId)"
# Migrations 2 and 4 shipped these two expressions; they stay as they were (migrations are never
# edited), and migration 6 replaces them with the ones generated from `semconv`'s rules below.
_SHIPPED_AGENT = (
    f"if({_attr(semconv.AGENT_NAME)} != '', {_attr(semconv.AGENT_NAME)}, {_attr(semconv.GEN_AI_AGENT_NAME)})"
)
_LLM_OPERATIONS = ", ".join(f"'{op}'" for op in semconv.GEN_AI_LLM_OPERATIONS)
_SHIPPED_IS_LLM_CALL = (
    f"(mapContains(SpanAttributes, '{semconv.GEN_AI_INPUT_MESSAGES}')"
    f" OR mapContains(SpanAttributes, '{semconv.LLM_RESPONSE_TOKEN_IDS}')"
    f" OR {_attr(semconv.GEN_AI_OPERATION_NAME)} IN ({_LLM_OPERATIONS})"
    f" OR {_attr(semconv.OPENINFERENCE_SPAN_KIND)} = '{semconv.OPENINFERENCE_LLM_KIND}'"
    f" OR arrayExists(k -> startsWith(k, '{semconv.LEGACY_PROMPT_PREFIX}'), mapKeys(SpanAttributes)))"
)
_EVAL = f"indexOf(Events.Name, '{semconv.GEN_AI_EVALUATION_EVENT}')"
_SHIPPED_REWARD = (
    f"multiIf(SpanName = '{semconv.REWARD_SPAN}', toFloat64OrNull({_attr(semconv.REWARD_VALUE)}),"
    f" {_EVAL} > 0, toFloat64OrNull(Events.Attributes[{_EVAL}]['{semconv.GEN_AI_EVALUATION_SCORE}']),"
    " NULL)"
)


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)


def _first_set(keys: tuple[str, ...]) -> str:
    """The first of `keys` with a non-empty value, else ''."""
    branches = "".join(f"{_attr(k)} != '', {_attr(k)}, " for k in keys[:-1])
    return f"multiIf({branches}{_attr(keys[-1])})"


def _llm_call_sql() -> str:
    """`semconv.is_llm_call`'s rule as a ClickHouse expression, generated from the same data."""
    kinds = "".join(
        f"{_attr(kind.key)} != '', {_attr(kind.key)} IN ({_quoted(kind.llm_values)}), "
        for kind in semconv.LLM_CALL_KINDS
    )
    prefixes = " OR ".join(f"startsWith(k, '{p}')" for p in semconv.LLM_CALL_KEY_PREFIXES)
    fallback = " OR ".join(
        [
            *(f"{_attr(key)} != ''" for key in semconv.LLM_CALL_KEYS),
            # the key first: `AND` evaluates the value only for the few keys that match
            f"arrayExists((k, v) -> ({prefixes}) AND v != '', mapKeys(SpanAttributes), mapValues(SpanAttributes))",
        ]
    )
    return f"multiIf({kinds}{fallback})"


def _reward_records_sql(reward_spans: tuple[semconv.RewardSpan, ...] = semconv.REWARD_SPANS) -> str:
    """The span's reward records, `(value, final, time, position)`, per `semconv`'s reward rule.

    Position 0 is a reward span's own value, i its i-th event; records without a number are left out
    (so a span whose value is optional and unset records none, as `semconv.reward_value_key` says).
    """
    final = f"'{semconv.REWARD_FINAL_TRUE}'"
    names = _quoted(tuple(r.name for r in reward_spans))
    values = "".join(f"SpanName = '{r.name}', toFloat64OrNull({_attr(r.value_key)}), " for r in reward_spans)
    own = (
        f"arrayFilter(r -> SpanName IN ({names}), [(multiIf({values}NULL),"
        f" {_attr(semconv.REWARD_FINAL)} = {final}, Timestamp, toUInt32(0))])"
    )
    events = (
        f"arrayMap((n, a, t, i) -> (if(n = '{semconv.GEN_AI_EVALUATION_EVENT}'"
        f" AND mapContains(a, '{semconv.GEN_AI_EVALUATION_SCORE}'),"
        f" toFloat64OrNull(a['{semconv.GEN_AI_EVALUATION_SCORE}']), NULL), a['{semconv.REWARD_FINAL}'] = {final},"
        " t, toUInt32(i)), `Events.Name`, `Events.Attributes`, `Events.Timestamp`, arrayEnumerate(`Events.Name`))"
    )
    return f"arrayFilter(r -> r.1 IS NOT NULL, arrayConcat({own}, {events}))"


# The span's reward columns: its greatest record by `semconv.reward_order` (the last marked final,
# else the last), whether that one is final, its time, and how many rewards the span records.
# `Store.rollouts()` takes the rollout's greatest by (RewardFinal, RewardTime, SpanId): the final
# reward training uses.
_BEST_REWARD = "arrayReverseSort(r -> (r.2, r.3, r.4), {records})[1]"
_REWARD_COLUMNS = (
    ("Reward", "Nullable(Float64)", "if(empty({records}), NULL, {best}.1)"),
    ("RewardFinal", "Bool", "{best}.2"),
    ("RewardTime", "DateTime64(9)", "{best}.3"),
    ("RewardCount", "UInt16", "length({records})"),
)


@dataclass(frozen=True)
class _Rules:
    """The typed columns the view derives from a span, as SQL expressions."""

    agent: str
    is_llm_call: str
    rewards: tuple[tuple[str, str], ...]  # (column, expression)
    with_: str = ""  # a WITH clause naming what the expressions share


_SHIPPED_RULES = _Rules(_SHIPPED_AGENT, _SHIPPED_IS_LLM_CALL, (("Reward", _SHIPPED_REWARD),))


# Migration 6 shipped the reward rule with Lightspan's reward span only; migration 7 adds Agent
# Lightning's annotation span.
_SHIPPED_REWARD_SPANS = semconv.REWARD_SPANS[:1]


def _rules(
    *, inline: bool = False, reward_spans: tuple[semconv.RewardSpan, ...] = semconv.REWARD_SPANS
) -> _Rules:
    """`semconv`'s rules as SQL. The view names the reward records and their greatest once in a
    WITH clause (`_rewards`, `_best_reward`); an UPDATE has no WITH, so `inline` spells them out."""
    records = _reward_records_sql(reward_spans) if inline else "_rewards"
    best = _BEST_REWARD.format(records=records) if inline else "_best_reward"
    return _Rules(
        _first_set(semconv.AGENT_KEYS),
        _llm_call_sql(),
        tuple((name, expr.format(records=records, best=best)) for name, _, expr in _REWARD_COLUMNS),
        ""
        if inline
        else f"WITH {_reward_records_sql(reward_spans)} AS _rewards,"
        f" {_BEST_REWARD.format(records='_rewards')} AS _best_reward\n",
    )


# The Nested span events and links, the same in otel_traces and its copy in rollout_spans.
_EVENTS_AND_LINKS = """    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),"""


class _DDL:
    """Renders engine and name choices for single-node or clustered deployments."""

    def __init__(self, options: SchemaOptions):
        self.options = options

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER {self.options.cluster}" if self.options.cluster else ""

    def local(self, table: str) -> str:
        return f"{table}_local" if self.options.cluster else table

    def engine(self, table: str, engine: str = "MergeTree") -> str:
        if not self.options.cluster:
            return f"{engine}()"
        path = f"'/clickhouse/tables/{{shard}}/{{database}}/{table}'"
        return f"Replicated{engine}({path}, '{{replica}}')"

    def ttl(self, column: str) -> str:
        days = self.options.ttl_days
        return f"TTL toDateTime({column}) + toIntervalDay({days})" if days else ""

    def distributed(self, table: str, sharding_key: str) -> list[str]:
        """The plain-named Distributed table over `<table>_local`, when clustered."""
        if not self.options.cluster:
            return []
        return [
            (
                f"CREATE TABLE IF NOT EXISTS {table}{self.on_cluster} AS {self.local(table)}"
                f" ENGINE = Distributed('{self.options.cluster}', currentDatabase(), {self.local(table)},"
                f" {sharding_key})"
            )
        ]


def _traces(d: _DDL) -> list[str]:
    table = d.local(TRACES)
    # Spans of one rollout stay on one shard, so rollout_spans can collapse their duplicates.
    sharding = f"cityHash64({_ROLLOUT_ID})"
    return [
        f"""CREATE TABLE IF NOT EXISTS {table}{d.on_cluster} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
{_EVENTS_AND_LINKS}
    ResourceAttributeItems Array(String) ALIAS
        arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    SpanAttributeItems Array(String) ALIAS
        arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1,
    INDEX idx_lower_span_name lower(SpanName) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = {d.engine(TRACES)}
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
{d.ttl("Timestamp")}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
        *d.distributed(TRACES, sharding),
        f"""CREATE TABLE IF NOT EXISTS {d.local(TRACE_ID_TS)}{d.on_cluster} (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = {d.engine(TRACE_ID_TS, "AggregatingMergeTree")}
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
{d.ttl("Start")}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
        *d.distributed(TRACE_ID_TS, "cityHash64(TraceId)"),
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {d.local(TRACE_ID_TS)}_mv{d.on_cluster}
TO {d.local(TRACE_ID_TS)}
AS SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM {table}
WHERE TraceId != ''
GROUP BY TraceId""",
    ]


def _rollout_spans(d: _DDL) -> list[str]:
    table = d.local(ROLLOUT_SPANS)
    return [
        f"""CREATE TABLE IF NOT EXISTS {table}{d.on_cluster} (
    RolloutId String CODEC(ZSTD(1)),
    TaskId String CODEC(ZSTD(1)),
    Attempt UInt32,
    AgentName LowCardinality(String),
    ResourcesId LowCardinality(String),
    IsLLMCall Bool,
    Reward Nullable(Float64),
    PromptTokenIds Array(UInt32) CODEC(ZSTD(1)),
    ResponseTokenIds Array(UInt32) CODEC(ZSTD(1)),
    ResponseLogprobs Array(Float64) CODEC(ZSTD(1)),
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String),
    SpanKind LowCardinality(String),
    ServiceName LowCardinality(String),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64,
    StatusCode LowCardinality(String),
    StatusMessage String CODEC(ZSTD(1)),
{_EVENTS_AND_LINKS}
    INDEX idx_task TaskId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_resources ResourcesId TYPE set(100) GRANULARITY 1
) ENGINE = {d.engine(ROLLOUT_SPANS, "ReplacingMergeTree")}
PARTITION BY toYYYYMM(Timestamp)
ORDER BY (RolloutId, TraceId, SpanId)
{d.ttl("Timestamp")}""",
        *d.distributed(ROLLOUT_SPANS, "cityHash64(RolloutId)"),
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv{d.on_cluster}\nTO {table}\nAS {_rollout_select(d, _TOKEN_COLUMNS)}",
    ]


# Token ids and logprobs as typed arrays, parsed from the attributes' JSON.
_TOKEN_COLUMNS = (
    ("PromptTokenIds", "Array(UInt32)", semconv.LLM_PROMPT_TOKEN_IDS),
    ("ResponseTokenIds", "Array(UInt32)", semconv.LLM_RESPONSE_TOKEN_IDS),
    ("ResponseLogprobs", "Array(Float64)", semconv.LLM_RESPONSE_LOGPROBS),
)


def _token_expression(type_: str, key: str) -> str:
    return f"JSONExtract({_attr(key)}, '{type_}')"


def _rollout_select(
    d: _DDL,
    token_columns: tuple[tuple[str, str, str], ...] = (),
    rules: _Rules = _SHIPPED_RULES,
    rollout_id: str = _ROLLOUT_ID,
) -> str:
    """The view's SELECT: typed columns (`token_columns` among them when they are stored), then the span."""
    tokens = "".join(
        f"\n    {_token_expression(type_, key)} AS {name}," for name, type_, key in token_columns
    )
    rewards = "".join(f"\n    {expr} AS {name}," for name, expr in rules.rewards)
    return f"""{rules.with_}SELECT
    {rollout_id} AS RolloutId,
    {_attr(semconv.TASK_ID)} AS TaskId,
    toUInt32OrZero({_attr(semconv.ATTEMPT)}) AS Attempt,
    {rules.agent} AS AgentName,
    {_attr(semconv.RESOURCES_ID)} AS ResourcesId,
    {rules.is_llm_call} AS IsLLMCall,{rewards}{tokens}
    Timestamp, TraceId, SpanId, ParentSpanId, TraceState, SpanName, SpanKind, ServiceName,
    ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode, StatusMessage,
    `Events.Timestamp`, `Events.Name`, `Events.Attributes`,
    `Links.TraceId`, `Links.SpanId`, `Links.TraceState`, `Links.Attributes`
FROM {d.local(TRACES)}"""


def _token_ids_on_read(d: _DDL) -> list[str]:
    """Token ids and logprobs become ALIAS columns, parsed from `SpanAttributes` when read.

    Parsing them on every insert and storing them a second time (they are already in the span's
    attributes, copied into this table) was a fifth of the insert's work and a tenth of the store's
    CPU with merges, for columns training never reads: the trainer takes token ids from the
    attributes.
    The view stops writing them first (`MODIFY QUERY`, ClickHouse 24.1 or later; older servers
    need `allow_experimental_alter_materialized_view_structure`), so no insert ever targets an
    ALIAS column.
    """
    table = d.local(ROLLOUT_SPANS)
    statements = [f"ALTER TABLE {table}_mv{d.on_cluster} MODIFY QUERY {_rollout_select(d)}"]
    for target in (table, ROLLOUT_SPANS) if d.options.cluster else (table,):
        drops = ", ".join(f"DROP COLUMN IF EXISTS {name}" for name, _, _ in _TOKEN_COLUMNS)
        after = "Reward"
        adds = []
        for name, type_, key in _TOKEN_COLUMNS:
            adds.append(
                f"ADD COLUMN IF NOT EXISTS {name} {type_} ALIAS {_token_expression(type_, key)} AFTER {after}"
            )
            after = name
        statements += [
            f"ALTER TABLE {target}{d.on_cluster} {drops}",
            f"ALTER TABLE {target}{d.on_cluster} {', '.join(adds)}",
        ]
    return statements


# Parts up to this many uncompressed bytes are written Compact (one data file) instead of Wide.
COMPACT_PART_BYTES = 128 << 20


def _compact_parts(d: _DDL) -> list[str]:
    """Inserted span parts, and the merges of a few of them, in the Compact format.

    A Wide part has files per column: in otel_traces and rollout_spans, with their Map, Nested
    and skip-index files, 125 and 151 of them for one 32,768-span insert, against 13 each
    Compact; a collector creates and deletes those files several times a second. Measured with
    `benchmarks/ingest.py`: ingest 53-58k -> 68-75k spans/s, collector CPU 30-35 -> 25-28 µs a
    span, and the raw insert rate no longer falls by half after a previous run's deletions
    (ext4 without a journal checks every recently freed inode). Big merged parts stay Wide,
    which suits reading a few columns of many rows.
    """
    return [
        f"ALTER TABLE {d.local(table)}{d.on_cluster} MODIFY SETTING min_bytes_for_wide_part = {COMPACT_PART_BYTES}"
        for table in (TRACES, ROLLOUT_SPANS)
    ]


def _resources_and_metrics(d: _DDL) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {d.local(RESOURCES)}{d.on_cluster} (
    Name LowCardinality(String),
    Version UInt32,
    Kind Enum8('prompt' = 1, 'checkpoint' = 2),
    Uri String,
    Content String CODEC(ZSTD(1)),
    Metadata String CODEC(ZSTD(1)),
    Created DateTime64(3) DEFAULT now64(3)
) ENGINE = {d.engine(RESOURCES, "ReplacingMergeTree")}
ORDER BY (Name, Version)""",
        *d.distributed(RESOURCES, "cityHash64(Name)"),
        f"""CREATE TABLE IF NOT EXISTS {d.local(TRAIN_METRICS)}{d.on_cluster} (
    Run LowCardinality(String),
    Step UInt64,
    Name LowCardinality(String),
    Value Float64,
    Time DateTime64(3) DEFAULT now64(3)
) ENGINE = {d.engine(TRAIN_METRICS)}
ORDER BY (Run, Name, Step)""",
        *d.distributed(TRAIN_METRICS, "cityHash64(Run)"),
    ]


def _rules_from_semconv(d: _DDL) -> list[str]:
    """`IsLLMCall`, `AgentName` and the reward columns follow `semconv`'s rules, the ones training uses.

    Before, the view had its own copies of the rules, and they disagreed with `algorithms`: an
    `invoke_agent` span with input messages was a call here, a span with only `llm.request.type`
    or only output messages was not, OpenInference's `agent.name` was ignored, and `Reward` read
    only a span's first evaluation event and never `lightspan.reward.final`. The view now writes
    expressions generated from `semconv`'s data; three columns carry what picking the rollout's
    final reward needs (`RewardFinal`, `RewardTime`, `RewardCount`); and the rows already stored
    are rewritten once (a synchronous mutation: it rewrites these columns' files, so on a big
    store it takes a while, once). Every step is idempotent.
    """
    table = d.local(ROLLOUT_SPANS)
    statements = []
    for target in (table, ROLLOUT_SPANS) if d.options.cluster else (table,):
        adds = []
        after = "Reward"
        for name, type_, _ in _REWARD_COLUMNS[1:]:
            adds.append(f"ADD COLUMN IF NOT EXISTS {name} {type_} AFTER {after}")
            after = name
        statements.append(f"ALTER TABLE {target}{d.on_cluster} {', '.join(adds)}")
    shipped = _SHIPPED_REWARD_SPANS
    statements.append(
        f"ALTER TABLE {table}_mv{d.on_cluster} MODIFY QUERY {_rollout_select(d, rules=_rules(reward_spans=shipped))}"
    )
    inline = _rules(inline=True, reward_spans=shipped)
    updates = [("AgentName", inline.agent), ("IsLLMCall", inline.is_llm_call), *inline.rewards]
    assignments = ", ".join(f"{name} = {expr}" for name, expr in updates)
    statements.append(
        f"ALTER TABLE {table}{d.on_cluster} UPDATE {assignments} WHERE 1 SETTINGS mutations_sync = 2"
    )
    return statements


def _rollouts_from_traces(d: _DDL) -> list[str]:
    """A rollout is its traces: a span without rollout ids joins the rollout its trace names.

    An agent in another language sets the ids on its root span only (or an SDK stamps them from
    baggage on some services and not others), and spans arrive in any order, children usually
    before their root, in separate requests. So the view cannot know, when a span lands, which
    rollout it belongs to; it stores such a span under its trace id, and reads resolve it:
    `rollout_traces` holds, per trace, the least and greatest rollout id its spans name (an
    AggregatingMergeTree fed by a view on `otel_traces`, so a late root updates it, and duplicates
    change nothing); a trace that names exactly one rollout lends it to its id-less spans
    (`Store.span_trees`, `Store.rollouts`). Resolving when reading is right whatever the arrival
    order, and rewrites no stored row when a root lands; the cost is a join of one row per trace,
    measured in benchmarks/transitions.py.

    The view also reads `semconv`'s rollout rule (Agent Lightning's rollout and attempt resource
    attributes) and reward rule (Agent Lightning's annotation spans). Stored spans that name an
    Agent Lightning rollout are keyed by it again, `rollout_traces` is backfilled from
    `otel_traces`, and stored annotation spans get their reward columns rewritten.
    """
    traces = d.local(ROLLOUT_TRACES)
    own = _OWN_ROLLOUT_ID
    mapped = f"SELECT TraceId, min({own}) AS FirstRollout, max({own}) AS LastRollout"
    source = f"WHERE TraceId != '' AND ({own}) != '' GROUP BY TraceId"
    statements = [
        f"""CREATE TABLE IF NOT EXISTS {traces}{d.on_cluster} (
    TraceId String CODEC(ZSTD(1)),
    FirstRollout SimpleAggregateFunction(min, String) CODEC(ZSTD(1)),
    LastRollout SimpleAggregateFunction(max, String) CODEC(ZSTD(1))
) ENGINE = {d.engine(ROLLOUT_TRACES, "AggregatingMergeTree")}
ORDER BY TraceId""",
        *d.distributed(ROLLOUT_TRACES, "cityHash64(TraceId)"),
        (
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {traces}_mv{d.on_cluster}\nTO {traces}\n"
            f"AS {mapped}\nFROM {d.local(TRACES)}\n{source}"
        ),
        # The stored spans, once (min and max: running it again, or beside the view, changes nothing).
        f"INSERT INTO {ROLLOUT_TRACES} {mapped}\nFROM {TRACES}\n{source}",
    ]
    table = d.local(ROLLOUT_SPANS)
    statements.append(
        f"ALTER TABLE {table}_mv{d.on_cluster} MODIFY QUERY "
        f"{_rollout_select(d, rules=_rules(), rollout_id=_STORED_ROLLOUT_ID)}"
    )
    # Stored spans that name an Agent Lightning rollout and were keyed by their trace are keyed
    # again (a sorting key cannot be updated: the rows are deleted and selected anew from
    # otel_traces), so every rollout has rows under its own id and reads find its traces by key.
    # Deleted first: run again, the delete finds nothing and the insert's copies collapse.
    legacy = f"{_attr(semconv.ROLLOUT_ID)} = '' AND {_AGL_ROLLOUT} != ''"
    statements.append(
        f"ALTER TABLE {table}{d.on_cluster} DELETE WHERE RolloutId = TraceId AND {legacy}"
        " SETTINGS mutations_sync = 2"
    )
    plain = _DDL(SchemaOptions())  # through the Distributed tables when clustered
    statements.append(
        f"INSERT INTO {ROLLOUT_SPANS} {_rollout_select(plain, rules=_rules(), rollout_id=_STORED_ROLLOUT_ID)}"
        f"\nWHERE {legacy}"
    )
    inline = _rules(inline=True)
    assignments = ", ".join(f"{name} = {expr}" for name, expr in inline.rewards)
    names = _quoted(tuple(r.name for r in semconv.REWARD_SPANS[len(_SHIPPED_REWARD_SPANS) :]))
    statements.append(
        f"ALTER TABLE {table}{d.on_cluster} UPDATE {assignments} WHERE SpanName IN ({names})"
        " SETTINGS mutations_sync = 2"
    )
    return statements


def _resource_routes(d: _DDL) -> list[str]:
    """Routes between resource versions, append-only like `resources` (see `store.routing`).

    A row is a whole route: the versions and their weights, what wrote it (`route`, `promote`,
    `rollback`), its number among the name's rows (`Seq`, the newest wins), and the promotion
    history after it, which `rollback` reads. A name without rows follows its latest version.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS {d.local(RESOURCE_ROUTES)}{d.on_cluster} (
    Name LowCardinality(String),
    Seq UInt32,
    Action Enum8('route' = 1, 'promote' = 2, 'rollback' = 3),
    Versions Array(UInt32),
    Weights Array(Float64),
    Promoted Array(UInt32),
    Created DateTime64(3) DEFAULT now64(3)
) ENGINE = {d.engine(RESOURCE_ROUTES, "ReplacingMergeTree")}
ORDER BY (Name, Seq)""",
        *d.distributed(RESOURCE_ROUTES, "cityHash64(Name)"),
    ]


# Parts up to this many uncompressed bytes are written Packed: the whole part in one file.
PACKED_PART_BYTES = 16 << 20


def _packed_parts(d: _DDL) -> list[str]:
    """Small parts of the span tables and the tables their views feed in one file each (Packed).

    The commit of a small batch, which is what an idle collector makes of each export (adaptive
    group commit), was mostly fixed cost: one part in each of four tables, 10-13 files a part
    even Compact, and creating a file costs 0.4-0.5 ms of kernel CPU on an ext4 without a journal
    (it scans recently freed inodes). A Packed part is one `data.packed` file; parts past
    `PACKED_PART_BYTES` (big batches, merges) are written as before. Measured on the store's own
    insert path (1-span and 512-span Native inserts, merges stopped, 2-core VM, shared): CPU per
    insert 48-60 -> 28-31 ms and 52-65 -> 32-34 ms. What is stored and read is unchanged; merges
    and mutations read Packed parts like any other.

    ClickHouse documents the setting as a ClickHouse Cloud feature. The ClickHouse inside chDB
    (4.4, ClickHouse 26.9) writes, merges, mutates and reloads such parts (tests/store), so the
    embedded store, whose ClickHouse is the one we ship and test, gets it; a ClickHouse server or
    cluster gets nothing (its owner's version and support are not ours to assume).
    """
    if not d.options.embedded:
        return []
    return [
        f"ALTER TABLE {table} MODIFY SETTING min_bytes_for_full_part_storage = {PACKED_PART_BYTES}"
        for table in (TRACES, TRACE_ID_TS, ROLLOUT_SPANS, ROLLOUT_TRACES)
    ]


# Numbered migrations. Append new ones; never edit one that has shipped.
MIGRATIONS = (
    (1, "otel_traces as the OpenTelemetry ClickHouse exporter creates it", _traces),
    (2, "rollout_spans materialised view", _rollout_spans),
    (3, "resources and train_metrics", _resources_and_metrics),
    (4, "rollout_spans token ids and logprobs computed on read", _token_ids_on_read),
    (5, "span tables write Compact parts up to 128 MiB", _compact_parts),
    (6, "rollout_spans IsLLMCall, AgentName and rewards follow semconv's rules", _rules_from_semconv),
    (7, "a rollout is its traces: rollout_traces; Agent Lightning ids and rewards", _rollouts_from_traces),
    (8, "resource_routes: canaries, splits, promotions and rollbacks", _resource_routes),
    (9, "small span parts written Packed, one file each", _packed_parts),
)

LATEST_VERSION = MIGRATIONS[-1][0]


def schema_version_ddl(options: SchemaOptions) -> str:
    d = _DDL(options)
    return f"""CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION}{d.on_cluster} (
    Version UInt32,
    Description String,
    Applied DateTime64(3) DEFAULT now64(3)
) ENGINE = {d.engine(SCHEMA_VERSION, "ReplacingMergeTree")}
ORDER BY Version"""


def migration_statements(version: int, options: SchemaOptions) -> list[str]:
    """The DDL statements of one migration, rendered for these options."""
    for number, _, build in MIGRATIONS:
        if number == version:
            return build(_DDL(options))
    raise KeyError(version)
