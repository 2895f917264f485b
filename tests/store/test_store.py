"""The LightningStore on real chDB: round trips, dedup, trees, parameters, migrations, locking."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from lightspan import semconv
from lightspan.errors import InvalidInput, NotFound, StoreLocked
from lightspan.store import Store, parse_store_url
from lightspan.store.schema import SchemaOptions, migration_statements, schema_version_ddl
from lightspan.store.store import BACKGROUND_NICE
from lightspan.types import Span, SpanEvent, SpanLink
from tests.helpers.rule_cases import TREES, expected_columns, stored_columns
from tests.helpers.spanfactory import rollout_spans


def _span(span_id: str, parent: str, start: int, **attrs: str) -> Span:
    return Span(
        "ab" * 16,
        span_id,
        parent,
        f"span-{span_id}",
        start,
        start + 1_000_123,
        {semconv.ROLLOUT_ID: "r1", semconv.TASK_ID: "t1", **attrs},
    )


def test_round_trip_keeps_every_field(store):
    span = Span(
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        parent_span_id="00f067aa0ba902b7",
        name="chat gpt",
        start_ns=1_700_000_000_123_456_789,
        end_ns=1_700_000_001_000_000_001,
        attributes={
            semconv.ROLLOUT_ID: "r-1",
            "gen_ai.input.messages": '[{"role":"user","content":"hi"}]',
            "weird key with spaces": "a'b\"c;",
        },
        kind="Client",
        status_code="Error",
        status_message="boom",
        service_name="svc",
        resource_attributes={"service.name": "svc", "host.name": "h"},
        scope_name="scope",
        scope_version="1.2",
        trace_state="k=v",
        events=[
            SpanEvent("exception", 1_700_000_000_500_000_001, {"exception.message": "x"}),
            SpanEvent("second", 1_700_000_000_600_000_002, {}),
        ],
        links=[SpanLink("11" * 16, "22" * 8, "s=1", {"link.kind": "retry"})],
    )
    store.insert_spans([span])
    (got,) = store.span_tree("r-1").spans
    assert got == span


def test_duplicate_spans_collapse(store):
    spans = rollout_spans("r-dup", "task", seed=1)
    store.insert_spans(spans)
    store.insert_spans(spans)  # a client retry after a lost ack
    store.insert_spans(spans[:3])
    assert len(store.span_tree("r-dup")) == len(spans)
    assert store.sql("SELECT count() FROM rollout_spans FINAL").scalar() == len(spans)
    assert (
        store.sql("SELECT count() FROM otel_traces").scalar() == 2 * len(spans) + 3
    )  # the landing table keeps all


def test_span_tree_orders_children_by_start_time(store):
    # Inserted out of order, across two batches.
    store.insert_spans([_span("c2", "root", 300), _span("g1", "c1", 250)])
    store.insert_spans([_span("c1", "root", 200), _span("root", "", 100), _span("c0", "root", 150)])
    tree = store.span_tree("r1")
    assert [(depth, s.span_id) for depth, s in tree.walk()] == [
        (0, "root"),
        (1, "c0"),
        (1, "c1"),
        (2, "g1"),
        (1, "c2"),
    ]
    assert [s.span_id for s in tree.children(tree.get("root"))] == ["c0", "c1", "c2"]
    assert tree.parent(tree.get("g1")).span_id == "c1"


def test_unknown_rollout_is_not_found(store):
    with pytest.raises(NotFound, match="nope"):
        store.span_tree("nope")


def test_parameters_are_data_not_sql(store):
    hostile = "x'); DROP TABLE otel_traces; --"
    store.insert_spans([Span("cd" * 16, "ef" * 8, "", hostile, 1, 2, {semconv.ROLLOUT_ID: hostile})])
    rows = store.sql(
        "SELECT SpanName FROM otel_traces WHERE SpanName = {name:String}", {"name": hostile}
    ).rows
    assert rows == [(hostile,)]
    assert store.span_tree(hostile).spans[0].name == hostile
    assert store.rollouts(task=hostile) == []
    assert store.sql("EXISTS TABLE otel_traces").scalar() == 1


def test_sql_errors_carry_clickhouse_message(store):
    with pytest.raises(InvalidInput, match="Syntax error"):
        store.sql("SELEC 1")
    with pytest.raises(InvalidInput, match="UNKNOWN_TABLE|Unknown table"):
        store.sql("SELECT * FROM no_such_table")


def test_migrations_are_idempotent(store_url):
    tables = (
        "SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    )
    with Store.connect(store_url, migrate=False) as s:
        assert s.migrate() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        before = s.sql(tables).rows
        assert s.migrate() == []
        assert s.sql(tables).rows == before
        assert s.sql("SELECT count() FROM schema_version FINAL").scalar() == 9
    with Store.connect(store_url) as s:  # a second open migrates nothing either
        assert s.schema_version() == s.latest_schema_version == 9
        assert s.sql(tables).rows == before


def test_token_id_migration_keeps_stored_rows_and_new_inserts_readable(store_url, monkeypatch):
    """A store from before migration 4 stored token ids as columns; after it they are parsed from
    the attributes on read, for the rows already there and for new ones alike."""
    import lightspan.store.store as store_module

    typed = (
        "SELECT RolloutId, sum(length(PromptTokenIds)), sum(length(ResponseTokenIds)), "
        "sum(arraySum(ResponseLogprobs)) FROM rollout_spans FINAL GROUP BY RolloutId ORDER BY RolloutId"
    )
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:3])
        with Store.connect(store_url) as old:
            assert old.schema_version() == 3
            old.insert_spans(rollout_spans("r-old", "t", seed=1))
            before = old.sql(typed).rows
    assert before == [("r-old", 60, 30, -15.0)]
    with Store.connect(store_url) as s:
        assert s.schema_version() == s.latest_schema_version
        assert s.sql(typed).rows == before
        s.insert_spans(rollout_spans("r-new", "t", seed=2))
        assert s.sql(typed).rows == [("r-new", 60, 30, -15.0), *before]
        columns = dict(
            s.sql(
                "SELECT name, default_kind FROM system.columns WHERE table = 'rollout_spans' AND name "
                "IN ('PromptTokenIds', 'ResponseTokenIds', 'ResponseLogprobs')"
            ).rows
        )
        assert columns == {
            "PromptTokenIds": "ALIAS",
            "ResponseTokenIds": "ALIAS",
            "ResponseLogprobs": "ALIAS",
        }


def test_span_inserts_write_compact_parts_and_a_migrated_store_does_too(store_url, monkeypatch):
    """One data file per inserted part, not files per column: a store from before migration 5
    gets the setting too, and its Wide parts stay readable beside the new Compact ones."""
    import lightspan.store.store as store_module

    parts = (
        "SELECT table, part_type FROM system.parts WHERE active AND table IN ('otel_traces', 'rollout_spans') "
        "ORDER BY table, part_type"
    )
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
        with Store.connect(store_url) as old:
            old.command("ALTER TABLE otel_traces MODIFY SETTING min_bytes_for_wide_part = 0")
            old.command("ALTER TABLE rollout_spans MODIFY SETTING min_bytes_for_wide_part = 0")
            old.command("SYSTEM STOP MERGES")
            wide = rollout_spans("r-wide", "t", seed=1)
            old.insert_spans(wide)
            assert old.sql(parts).rows == [("otel_traces", "Wide"), ("rollout_spans", "Wide")]
    with Store.connect(store_url) as s:
        s.command("SYSTEM STOP MERGES")
        compact = rollout_spans("r-compact", "t", seed=2)
        s.insert_spans(compact)
        assert s.sql(parts).rows == [
            ("otel_traces", "Compact"),
            ("otel_traces", "Wide"),
            ("rollout_spans", "Compact"),
            ("rollout_spans", "Wide"),
        ]
        assert s.sql(
            "SELECT RolloutId, count() FROM rollout_spans FINAL GROUP BY RolloutId ORDER BY RolloutId"
        ).rows == [("r-compact", len(compact)), ("r-wide", len(wide))]


def test_small_inserts_write_packed_parts_that_merge_mutate_and_reload(store_url, monkeypatch):
    """A small insert writes one Packed part (one file) into each span table, a store from before
    migration 9 gets the setting too, and its Full parts stay readable beside the Packed ones,
    after a reopen (parts loaded from disk), a mutation and a merge into one part."""
    import lightspan.store.store as store_module

    tables = ("otel_traces", "otel_traces_trace_id_ts", "rollout_spans", "rollout_traces")
    parts = (
        "SELECT table, part_storage_type, count() FROM system.parts WHERE active AND table IN "
        f"{tables} GROUP BY ALL ORDER BY ALL"
    )
    per_rollout = (
        "SELECT RolloutId, count(), sum(Attempt) FROM rollout_spans FINAL GROUP BY RolloutId ORDER BY 1"
    )
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:8])
        with Store.connect(store_url) as old:
            old.command("SYSTEM STOP MERGES")
            full = rollout_spans("r-full", "t", seed=1)
            old.insert_spans(full)
            assert old.sql(parts).rows == [(table, "Full", 1) for table in tables]
    with Store.connect(store_url) as s:
        s.command("SYSTEM STOP MERGES")
        packed = rollout_spans("r-packed", "t", seed=2)
        s.insert_spans(packed)
        assert s.sql(parts).rows == [(table, kind, 1) for table in tables for kind in ("Full", "Packed")]
    with Store.connect(store_url) as s:  # reopened: the Packed parts load from their files
        expected = [("r-full", len(full), 0), ("r-packed", len(packed), 0)]
        assert s.sql(per_rollout).rows == expected
        assert set(s.span_trees(["r-full", "r-packed"])) == {"r-full", "r-packed"}
        s.command("SYSTEM START MERGES")
        s.command("ALTER TABLE rollout_spans UPDATE Attempt = 1 WHERE 1 SETTINGS mutations_sync = 2")
        for table in tables:
            s.command(f"OPTIMIZE TABLE {table} FINAL")
        assert s.sql(parts).rows == [(table, "Packed", 1) for table in tables]
        assert s.sql(per_rollout).rows == [(r, n, n) for r, n, _ in expected]
        assert s.sql("SELECT count() FROM otel_traces_trace_id_ts FINAL").scalar() == len(
            {span.trace_id for span in full + packed}
        )


def test_otel_traces_matches_the_clickhouse_exporter_layout(store):
    columns = store.sql(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'otel_traces' "
        "AND default_kind != 'ALIAS' ORDER BY position"
    ).rows
    assert columns == [
        ("Timestamp", "DateTime64(9)"),
        ("TraceId", "String"),
        ("SpanId", "String"),
        ("ParentSpanId", "String"),
        ("TraceState", "String"),
        ("SpanName", "LowCardinality(String)"),
        ("SpanKind", "LowCardinality(String)"),
        ("ServiceName", "LowCardinality(String)"),
        ("ResourceAttributes", "Map(LowCardinality(String), String)"),
        ("ScopeName", "String"),
        ("ScopeVersion", "String"),
        ("SpanAttributes", "Map(LowCardinality(String), String)"),
        ("Duration", "UInt64"),
        ("StatusCode", "LowCardinality(String)"),
        ("StatusMessage", "String"),
        ("Events.Timestamp", "Array(DateTime64(9))"),
        ("Events.Name", "Array(LowCardinality(String))"),
        ("Events.Attributes", "Array(Map(LowCardinality(String), String))"),
        ("Links.TraceId", "Array(String)"),
        ("Links.SpanId", "Array(String)"),
        ("Links.TraceState", "Array(String)"),
        ("Links.Attributes", "Array(Map(LowCardinality(String), String))"),
    ]
    keys = store.sql(
        "SELECT partition_key, sorting_key FROM system.tables WHERE database = currentDatabase() "
        "AND name = 'otel_traces'"
    ).rows
    assert keys == [("toDate(Timestamp)", "ServiceName, SpanName, toDateTime(Timestamp), Timestamp")]


def _cap_sys_nice() -> bool:
    status = Path("/proc/self/status")
    if not status.exists():
        return False
    effective = next(line for line in status.read_text().splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE is capability 23


def _running_merge_nice_values() -> set[int]:
    """Nice values of this process's ClickHouse merge threads that are on a CPU right now."""
    seen = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "MergeMutate" and fields[0] == "R":
            seen.add(int(fields[16]))
    return seen


def test_the_embedded_engine_merges_at_a_lower_cpu_priority(store):
    """Merges are background work on the apps' own machine (`EMBEDDED_ENGINE_SETTINGS`): the
    engine takes the setting, and where the process may renice threads (CAP_SYS_NICE) a merge
    runs at BACKGROUND_NICE."""
    setting = "SELECT value FROM system.server_settings WHERE name = 'os_threads_nice_value_merge_mutate'"
    assert store.sql(setting).scalar() == str(BACKGROUND_NICE)
    if not _cap_sys_nice():
        pytest.skip("without CAP_SYS_NICE ClickHouse leaves merge threads at the process's priority")
    store.command("CREATE TABLE merged (x UInt64, s String) ENGINE = MergeTree ORDER BY x")
    store.command("SYSTEM STOP MERGES merged")
    for part in range(8):
        store.command(
            f"INSERT INTO merged SELECT number, toString(cityHash64(number)) FROM numbers({part * 300_000}, 300_000)"
        )
    store.command("SYSTEM START MERGES merged")
    merging = threading.Thread(target=store.command, args=("OPTIMIZE TABLE merged FINAL",))
    seen: set[int] = set()
    merging.start()
    while merging.is_alive():
        seen |= _running_merge_nice_values()
        time.sleep(0.001)
    assert BACKGROUND_NICE in seen, seen


def test_concurrent_inserts_lose_nothing(store):
    threads, batches = 6, 15

    def writer(w: int) -> None:
        for b in range(batches):
            store.insert_spans(rollout_spans(f"r-{w}-{b}", f"t{w}", seed=w * 1000 + b))

    workers = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    per_rollout = len(rollout_spans("x", "y"))
    assert store.sql("SELECT count() FROM otel_traces").scalar() == threads * batches * per_rollout
    assert len(store.rollouts(limit=None)) == threads * batches


def test_rollout_columns_and_filters(store):
    base = 1_700_000_000_000_000_000
    store.insert_spans(rollout_spans("ra", "task-a", reward=1.0, seed=1, start_ns=base, service="s1"))
    store.insert_spans(
        rollout_spans("rb", "task-a", reward=0.0, seed=2, start_ns=base + 10**12, service="s2")
    )
    store.insert_spans(rollout_spans("rc", "task-c", reward=None, seed=3, start_ns=base + 2 * 10**12))
    listed = store.rollouts()
    assert [r.rollout_id for r in listed] == ["rc", "rb", "ra"]
    ra = next(r for r in listed if r.rollout_id == "ra")
    assert (ra.task_id, ra.llm_calls, ra.rewards, ra.last_reward, ra.spans) == ("task-a", 5, 1, 1.0, 21)
    assert [r.rollout_id for r in store.rollouts(task="task-a")] == ["rb", "ra"]
    assert [r.rollout_id for r in store.rollouts(service="s1")] == ["ra"]
    assert [r.rollout_id for r in store.rollouts(min_rewards=1)] == ["rb", "ra"]
    since = datetime.fromtimestamp(base / 1e9) + timedelta(seconds=1)
    assert [r.rollout_id for r in store.rollouts(since=since)] == ["rc", "rb"]
    assert len(store.rollouts(limit=1)) == 1
    shards = [{r.task_id for r in store.rollouts(shard=(rank, 2), limit=None)} for rank in range(2)]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {"task-a", "task-c"}
    typed = store.sql(
        "SELECT countIf(IsLLMCall), sum(length(PromptTokenIds)) FROM rollout_spans FINAL "
        "WHERE RolloutId = 'ra'"
    ).rows
    assert typed == [(5, 60)]


def test_resources_are_versioned(store):
    assert store.latest_resource("policy") is None
    first = store.publish_resource("policy", "checkpoint", uri="/ckpt/1", metadata={"step": 1})
    second = store.publish_resource(
        "policy", "checkpoint", uri="/ckpt/2", metadata={"step": 2, "parent": first.id}
    )
    store.publish_resource("prompt", "prompt", content="You are {role}.")
    latest = store.latest_resource("policy")
    assert (first.version, second.version, latest.version, latest.uri) == (1, 2, 2, "/ckpt/2")
    assert latest.metadata == {"step": 2, "parent": "policy:1"} and latest.id == "policy:2"
    assert [r.version for r in store.resources("policy")] == [1, 2]
    with pytest.raises(InvalidInput):
        store.publish_resource("policy", "weights")


def test_metrics_round_trip(store):
    store.log_metrics("run-1", 1, {"loss": 2.0, "reward": 0.1})
    store.log_metrics("run-1", 2, {"loss": 1.0, "reward": 0.5})
    store.log_metrics("run-2", 1, {"loss": 9.0})
    assert store.metrics("run-1") == {"loss": [(1, 2.0), (2, 1.0)], "reward": [(1, 0.1), (2, 0.5)]}


def test_cluster_ddl_uses_on_cluster_replicated_and_distributed():
    # No ClickHouse cluster here: the generated DDL text is what we can check.
    options = SchemaOptions(cluster="prod")
    ddl = "\n".join(
        s for v in (1, 2, 3, 4, 5, 6, 8) for s in migration_statements(v, options)
    ) + schema_version_ddl(options)
    assert "CREATE TABLE IF NOT EXISTS otel_traces_local ON CLUSTER prod" in ddl
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/otel_traces', '{replica}')" in ddl
    assert (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/rollout_spans', '{replica}')"
        in ddl
    )
    assert (
        "CREATE TABLE IF NOT EXISTS otel_traces ON CLUSTER prod AS otel_traces_local ENGINE = "
        "Distributed('prod', currentDatabase(), otel_traces_local, cityHash64("
    ) in ddl
    assert "TO rollout_spans_local" in ddl and "FROM otel_traces_local" in ddl
    assert ddl.count("ON CLUSTER prod") == ddl.count("CREATE ") + ddl.count("ALTER ")
    alters = migration_statements(4, options)
    assert alters[0].startswith("ALTER TABLE rollout_spans_local_mv ON CLUSTER prod MODIFY QUERY SELECT")
    assert {s.split(" ON CLUSTER")[0] for s in alters[1:]} == {
        "ALTER TABLE rollout_spans_local",
        "ALTER TABLE rollout_spans",
    }
    assert migration_statements(5, options) == [
        f"ALTER TABLE {table}_local ON CLUSTER prod MODIFY SETTING min_bytes_for_wide_part = 134217728"
        for table in ("otel_traces", "rollout_spans")
    ]
    rules = migration_statements(6, options)
    assert [s.split(" ON CLUSTER prod ")[0] for s in rules] == [
        "ALTER TABLE rollout_spans_local",
        "ALTER TABLE rollout_spans",
        "ALTER TABLE rollout_spans_local_mv",
        "ALTER TABLE rollout_spans_local",
    ]
    assert rules[2].split(" ON CLUSTER prod ")[1].startswith("MODIFY QUERY WITH")
    assert rules[3].split(" ON CLUSTER prod ")[1].startswith("UPDATE AgentName = ")
    assert migration_statements(9, options) == []  # Packed parts under replication: not verified
    assert migration_statements(8, options)[1] == (
        "CREATE TABLE IF NOT EXISTS resource_routes ON CLUSTER prod AS resource_routes_local ENGINE = "
        "Distributed('prod', currentDatabase(), resource_routes_local, cityHash64(Name))"
    )
    assert (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/resource_routes', '{replica}')"
        in ddl
    )
    single = "\n".join(s for v in (1, 2, 3, 4, 5, 6, 8) for s in migration_statements(v, SchemaOptions()))
    assert "ON CLUSTER" not in single and "Distributed" not in single and "Replicated" not in single
    assert parse_store_url("http://u:p@h:9000/db?cluster=prod").cluster == "prod"
    # Packed parts (migration 9) only where the ClickHouse is chDB's, verified here.
    assert migration_statements(9, options) == migration_statements(9, SchemaOptions()) == []
    assert len(migration_statements(9, SchemaOptions(embedded=True))) == 4


def test_ttl_is_optional():
    ddl = migration_statements(1, SchemaOptions(ttl_days=7))[0]
    assert "TTL toDateTime(Timestamp) + toIntervalDay(7)" in ddl
    assert "TTL" not in migration_statements(1, SchemaOptions())[0]


def test_url_forms(tmp_path, monkeypatch):
    assert parse_store_url(f"chdb://{tmp_path}").path == tmp_path
    u = parse_store_url("https://alice:s%40cret@ch.example:9443/traces")
    assert (u.host, u.port, u.username, u.password, u.database, u.embedded) == (
        "ch.example",
        9443,
        "alice",
        "s@cret",
        "traces",
        False,
    )
    assert parse_store_url("http://h").port == 8123
    monkeypatch.setenv("LIGHTSPAN_STORE", f"chdb://{tmp_path}/env")
    assert parse_store_url(None).path == tmp_path / "env"
    for bad in ("mysql://h/db", "chdb://", "http:///db"):
        with pytest.raises(InvalidInput):
            parse_store_url(bad)


def test_a_locked_directory_names_its_path_and_the_way_in(tmp_path):
    path = tmp_path / "held"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from lightspan.store import Store
            s = Store.connect("chdb://{path}")
            print("ready", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked) as error:
            Store.connect(f"chdb://{path}")
        message = str(error.value)
        assert str(path) in message and f"process {holder.pid}" in message and "collector" in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with Store.connect(f"chdb://{path}") as store:  # released when the holder exits
        assert store.schema_version() == store.latest_schema_version


def test_one_directory_per_process_is_explained(store, tmp_path):
    with pytest.raises(StoreLocked, match="one data directory per process"):
        Store.connect(f"chdb://{tmp_path / 'other'}")
    with Store.connect(str(store.url)) as same:  # the same directory twice is fine
        assert same.schema_version() == same.latest_schema_version


def test_landed_rollouts_have_their_root(store):
    spans = rollout_spans("r-partial", "t", seed=9)
    store.insert_spans(spans[1:])  # children exported first; the root span ends last
    assert store.rollouts(landed=True) == [] and len(store.rollouts()) == 1
    store.insert_spans(spans[:1])
    (landed,) = store.rollouts(landed=True)
    assert landed.rollout_id == "r-partial" and landed.roots == 1


def test_migration_6_rewrites_the_rows_of_an_older_store(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store at version 5 kept the old copies of the rules; migrating rewrites its rows, and
    spans landed afterwards go through the new view: both then agree with `algorithms`."""
    import lightspan.store.store as store_module

    old_tree, new_tree = "invoke-agent-with-messages", "several-evaluation-events"
    columns = "SELECT SpanId, IsLLMCall, Reward FROM rollout_spans FINAL WHERE RolloutId = {r:String} ORDER BY SpanId"
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:5])
        with Store.connect(store_url) as old:
            assert old.schema_version() == 5
            old.insert_spans(TREES[old_tree] + TREES["reward-with-final-flag"])
            # The old view counted the invoke_agent span as a call and ignored the final flag.
            assert old.sql(columns, {"r": old_tree}).rows == [("c", True, None), ("root", True, None)]
    with Store.connect(store_url) as s:
        assert s.schema_version() == s.latest_schema_version
        assert s.migrate() == []  # idempotent: nothing left to apply
        s.insert_spans(TREES[new_tree])
        stored = stored_columns(s)
        for name in (old_tree, "reward-with-final-flag", new_tree):
            assert {k: v for k, v in stored.items() if k[0] == name} == expected_columns(name, TREES[name])
        finals = {r.rollout_id: r.final_reward for r in s.rollouts(limit=None)}
        assert finals["reward-with-final-flag"] == 0.5
    # Running migration 6's statements again changes nothing.
    from lightspan.store.schema import SchemaOptions, migration_statements

    with Store.connect(store_url) as s:
        before = stored_columns(s)
        for statement in migration_statements(6, SchemaOptions()):
            s.command(statement)
        assert stored_columns(s) == before


def test_migration_7_resolves_the_rows_of_an_older_store(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store at version 6 keyed Agent Lightning's spans and the children of a root-only rollout by
    their trace, and read no annotation reward; migrated, its stored rows read as the rollout rule
    says (through the backfilled `rollout_traces`), and so do spans landed afterwards."""
    import lightspan.store.store as store_module
    from lightspan.algorithms.transitions import group_rollouts, recorded_final_reward
    from tests.helpers.rule_cases import IDENTITY_CASES, TREES

    old_spans = IDENTITY_CASES["agent-lightning-resource"] + IDENTITY_CASES["ids-on-the-root-only"][1:]
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:6])
        with Store.connect(store_url) as old:
            old.insert_spans(old_spans + TREES["agent-lightning-annotations"])
            annotations = "SELECT countIf(Reward IS NOT NULL) FROM rollout_spans WHERE SpanName = 'agentlightning.annotation'"
            assert old.sql(annotations).scalar() == 0
    with Store.connect(store_url) as s:
        assert s.schema_version() == s.latest_schema_version
        s.insert_spans(IDENTITY_CASES["ids-on-the-root-only"][:1])  # the root lands after the migration
        expected = group_rollouts(old_spans + IDENTITY_CASES["ids-on-the-root-only"][:1])
        assert set(expected) == {"ro-1/at-1", "node-7"}
        trees = s.span_trees(expected)
        for rollout_id, group in expected.items():
            assert sorted(x.span_id for x in trees[rollout_id].spans) == sorted(x.span_id for x in group)
        finals = {r.rollout_id: r.final_reward for r in s.rollouts(limit=None)}
        assert finals["ro-1/at-1"] == 0.5 and finals["node-7"] == 1.0
        assert finals["agent-lightning-annotations"] == recorded_final_reward(
            TREES["agent-lightning-annotations"]
        )
        stored = {k: v for k, v in stored_columns(s).items() if k[0] == "agent-lightning-annotations"}
        assert stored == expected_columns("agent-lightning-annotations", TREES["agent-lightning-annotations"])
        before = stored_columns(s), s.sql("SELECT * FROM rollout_traces FINAL ORDER BY TraceId").rows
        for statement in migration_statements(7, SchemaOptions()):  # idempotent
            s.command(statement)
        assert (
            stored_columns(s),
            s.sql("SELECT * FROM rollout_traces FINAL ORDER BY TraceId").rows,
        ) == before


def test_cluster_ddl_of_migration_7() -> None:
    statements = migration_statements(7, SchemaOptions(cluster="prod"))
    assert statements[0].startswith("CREATE TABLE IF NOT EXISTS rollout_traces_local ON CLUSTER prod")
    assert (
        "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/rollout_traces'"
        in statements[0]
    )
    assert (
        "Distributed('prod', currentDatabase(), rollout_traces_local, cityHash64(TraceId))" in statements[1]
    )
    assert "FROM otel_traces_local" in statements[2] and "TO rollout_traces_local" in statements[2]
    # The backfill is one insert through the Distributed tables, not one per host.
    assert (
        statements[3].startswith("INSERT INTO rollout_traces SELECT")
        and "FROM otel_traces\n" in statements[3]
    )
    assert statements[4].startswith("ALTER TABLE rollout_spans_local_mv ON CLUSTER prod MODIFY QUERY WITH")
    assert statements[5].startswith("ALTER TABLE rollout_spans_local ON CLUSTER prod DELETE WHERE")
    assert (
        statements[6].startswith("INSERT INTO rollout_spans WITH")
        and "FROM otel_traces\nWHERE" in statements[6]
    )
    assert statements[7].startswith("ALTER TABLE rollout_spans_local ON CLUSTER prod UPDATE Reward = ")
