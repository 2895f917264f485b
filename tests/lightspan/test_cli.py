"""The `lightspan` command line as a user runs it: real processes, real chDB."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightspan import semconv
from lightspan.store import Store
from lightspan.types import Span
from tests.helpers.processes import run_cli
from tests.helpers.spanfactory import rollout_spans


@pytest.fixture
def filled(store_url):
    with Store.connect(store_url) as store:
        spans = rollout_spans("r-show", "task-1", llm_calls=2, extra_spans=1, reward=0.75)
        spans.append(
            Span(
                spans[0].trace_id,
                "f" * 16,
                spans[0].span_id,
                "tool.broken",
                spans[-1].start_ns + 10,
                spans[-1].start_ns + 20,
                {semconv.ROLLOUT_ID: "r-show"},
                status_code="Error",
                status_message="tool exploded",
            )
        )
        store.insert_spans(spans)
    return store_url


def test_store_init_and_migrate(store_url):
    first = run_cli("store", "init", "--store", store_url)
    assert first.returncode == 0 and "applied migrations 1, 2, 3, 4" in first.stdout
    again = run_cli("store", "migrate", "--store", store_url)
    assert again.returncode == 0 and "already up to date" in again.stdout


def test_sql_formats_and_parameters(filled):
    query = (
        "SELECT RolloutId, count() AS n FROM rollout_spans FINAL WHERE TaskId = {t:String} GROUP BY RolloutId"
    )
    as_json = run_cli("sql", query, "--param", "t=task-1", "--format", "json", "--store", filled)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"RolloutId": "r-show", "n": 5}  # the error span carries no task id
    as_csv = run_cli("sql", query, "--param", "t=task-1", "--format", "csv", "--store", filled)
    assert as_csv.stdout.splitlines() == ["RolloutId,n", "r-show,5"]
    pretty = run_cli("sql", query, "--param", "t=task-1", "--store", filled)
    assert "r-show" in pretty.stdout and "RolloutId" in pretty.stdout


def test_rollouts_and_show(filled):
    listed = run_cli("rollouts", "--format", "json", "--store", filled)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["rollout_id"], row["llm_calls"], row["last_reward"], row["errors"]) == ("r-show", 2, 0.75, 1)
    shown = run_cli("show", "r-show", "--store", filled)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "agent.run" in out and out.count("[LLM]") == 2 and "[reward 0.75]" in out
    assert "[ERROR tool exploded]" in out


def test_rollouts_table_fits_an_80_column_terminal(filled):
    pretty = run_cli("rollouts", "--store", filled, env={"COLUMNS": "80"})
    assert pretty.returncode == 0, pretty.stderr
    lines = pretty.stdout.splitlines()
    assert max(map(len, lines)) <= 80, pretty.stdout
    header = lines[0].split()
    # r-show has an error and a task of its own; no attempt or resources: those columns say nothing.
    assert header[:2] == ["rollout", "task"] and "errors" in header, header
    assert "attempt" not in header and "resources" not in header, header
    assert lines[2].split()[:2] == ["r-show", "task-1"], pretty.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["sql", "SELECT 1", "--store", "mysql://db/x"], "unknown store URL scheme"),
        (
            ["sql", "SELECT 1", "--store", "http://127.0.0.1:9/db"],
            "cannot reach ClickHouse at http://127.0.0.1:9/db",
        ),
        (["sql", "SELEC 1"], "Syntax error"),
        (["show", "no-such-rollout"], "no rollout 'no-such-rollout'"),
        (["sql", "SELECT 1", "--param", "novalue"], "--param wants NAME=VALUE"),
        (["rollouts", "--since", "yesterday"], "not an ISO date/time"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, store_url):
    result = run_cli(*args, env={"LIGHTSPAN_STORE": store_url})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lightspan: error:")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_every_subcommand_has_help():
    from lightspan.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"store", "sql", "rollouts", "show"} <= set(commands)
    for name in commands:
        result = run_cli(name, "--help")
        assert result.returncode == 0 and "usage: lightspan " + name in result.stdout


def test_a_missing_extra_is_named_not_a_traceback():
    # As in a bare `pip install lightspan`: the store's client is absent (None in sys.modules
    # makes its import fail the way a missing package does).
    code = (
        "import sys; sys.modules['clickhouse_connect'] = None; from lightspan.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    listing = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=False
    )
    assert listing.returncode == 0
    assert "pip install 'lightspan[store]'  (its commands need clickhouse_connect)" in listing.stdout
    assert " sql " not in listing.stdout and "collector" in listing.stdout  # the others still register
    run = subprocess.run(
        [sys.executable, "-c", code, "collector"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == (
        "lightspan: error: `lightspan collector` needs clickhouse_connect, which is not installed: "
        "pip install 'lightspan[collector]'\n"
    )


def test_import_lightspan_stays_light():
    code = (
        "import sys, lightspan, lightspan.semconv, lightspan.types; lightspan.__version__; "
        "heavy = [m for m in ('torch', 'chdb', 'clickhouse_connect', 'numpy', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_list_matches_the_lazy_exports():
    import lightspan

    assert sorted(lightspan.__all__) == sorted([*lightspan._EXPORTS, "__version__"])
    assert all(getattr(lightspan, name) is not None for name in lightspan.__all__)
