"""Store subcommands: `store init|migrate`, `sql`, `rollouts`, `show`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING

from lightspan.errors import InvalidInput

if TYPE_CHECKING:
    from rich.table import Table

    from lightspan.store.store import RolloutSummary

FORMATS = ("pretty", "json", "csv")


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="chdb:///path (embedded) or http(s)://user:pass@host:port/db; default: $LIGHTSPAN_STORE or "
        "./lightspan-data (reached through a running collector's SQL endpoint when it owns the directory)",
    )


def _open(args: argparse.Namespace, migrate: bool = True):
    from lightspan.store import Store

    return Store.connect(args.store, migrate=migrate)


def _cmd_store(args: argparse.Namespace) -> int:
    with _open(args, migrate=False) as store:
        applied = store.migrate()
        version = store.schema_version()
        done = f"applied migrations {', '.join(map(str, applied))}" if applied else "already up to date"
        print(f"{store.url}: schema version {version} ({done})")
    return 0


def _parse_param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidInput(f"--param wants NAME=VALUE, got {text!r}")
    return name, value


def _print_rows(rows, fmt: str) -> None:
    """Write a query result as a table, JSON lines or CSV on stdout."""
    if fmt == "json":
        for record in rows.dicts():
            print(json.dumps(record, default=str, ensure_ascii=False))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(rows.columns)
        writer.writerows(rows.rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*rows.columns)
        for row in rows.rows:
            table.add_row(*("NULL" if value is None else str(value) for value in row))
        Console().print(table)


def _cmd_sql(args: argparse.Namespace) -> int:
    params = dict(_parse_param(p) for p in args.param)
    with _open(args) as store:
        rows = store.sql(args.query, params)
    _print_rows(rows, args.format)
    return 0


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"not an ISO date/time: {text!r} (e.g. 2026-11-21T10:00)") from None


def _cmd_rollouts(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rollouts = store.rollouts(
            service=args.service,
            agent=args.agent,
            task=args.task,
            since=_time(args.since),
            until=_time(args.until),
            resources_id=args.resources,
            min_rewards=args.min_rewards,
            limit=args.limit,
        )
    if args.format == "json":
        for r in rollouts:
            print(
                json.dumps(
                    {
                        "rollout_id": r.rollout_id,
                        "task_id": r.task_id,
                        "attempt": r.attempt,
                        "service": r.service,
                        "resources_id": r.resources_id,
                        "agents": r.agents,
                        "spans": r.spans,
                        "llm_calls": r.llm_calls,
                        "rewards": r.rewards,
                        "final_reward": r.final_reward,
                        "last_reward": r.last_reward,
                        "start": r.start.isoformat(),
                        "end": r.end.isoformat(),
                        "errors": r.errors,
                    }
                )
            )
        return 0
    from rich.console import Console

    Console().print(_rollouts_table(rollouts))
    return 0


def compact_table() -> Table:
    """A listing's table for an 80-column terminal: a rule under the header, no borders, one space
    of padding between columns."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def _rollouts_table(rollouts: list[RolloutSummary]) -> Table:
    """The listing as a table for an 80-column terminal: the LLM calls and rewards of each rollout
    rather than its span count; a column that says nothing for any of these rollouts (the task when
    it is the rollout id, attempt 0, no resources, agents or errors) left out; the start to the
    minute. `--format json` has every field in full."""
    columns: dict[str, list[str]] = {
        "rollout": [r.rollout_id for r in rollouts],
        "task": [r.task_id for r in rollouts],
        "attempt": [str(r.attempt) for r in rollouts],
        "service": [r.service for r in rollouts],
        "resources": [r.resources_id for r in rollouts],
        "agents": [",".join(r.agents) for r in rollouts],
        "llm": [str(r.llm_calls) for r in rollouts],
        "rewards": [str(r.rewards) for r in rollouts],
        "reward": ["" if r.final_reward is None else f"{r.final_reward:g}" for r in rollouts],
        "start (UTC)": [r.start.strftime("%m-%d %H:%M") for r in rollouts],
        "errors": [str(r.errors) if r.errors else "" for r in rollouts],
    }
    silent = {
        "task": all(r.task_id in ("", r.rollout_id) for r in rollouts),
        "attempt": all(r.attempt == 0 for r in rollouts),
        "resources": not any(r.resources_id for r in rollouts),
        "agents": not any(r.agents for r in rollouts),
        "errors": not any(r.errors for r in rollouts),
    }
    shown = [name for name in columns if not silent.get(name, False)]
    table = compact_table()
    for name in shown:  # an id is what `lightspan show` needs: folded over lines, never cut
        table.add_column(name, overflow="fold" if name in ("rollout", "task") else "ellipsis")
    for row in zip(*(columns[name] for name in shown)):
        table.add_row(*row)
    return table


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightspan.store.render import render_tree

    with _open(args) as store:
        tree = store.span_tree(args.rollout_id)
        marks = store.span_rows([args.rollout_id], "SpanId, IsLLMCall, Reward")
    llm_calls = {span_id for _, span_id, is_llm, _ in marks if is_llm}
    rewards = {span_id: reward for _, span_id, _, reward in marks if reward is not None}
    Console().print(render_tree(tree, llm_calls, rewards))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser("store", help="create or migrate the store's schema")
    store.add_argument(
        "action",
        choices=["init", "migrate"],
        help="init: create the schema; migrate: apply pending migrations (both are idempotent)",
    )
    _store_argument(store)
    store.set_defaults(func=_cmd_store)

    sql = subparsers.add_parser(
        "sql",
        help="run a ClickHouse SQL query against the store",
        description="Run ClickHouse SQL. Values go as server-side parameters: "
        "write {name:Type} in the query and pass --param name=value.",
    )
    sql.add_argument("query", help='the SQL text, e.g. "SELECT count() FROM otel_traces"')
    sql.add_argument(
        "--format", choices=FORMATS, default="pretty", help="a table, JSON lines or CSV (default: pretty)"
    )
    sql.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a query parameter for a {NAME:Type} placeholder (repeatable)",
    )
    _store_argument(sql)
    sql.set_defaults(func=_cmd_sql)

    rollouts = subparsers.add_parser("rollouts", help="list rollouts, newest first")
    rollouts.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    rollouts.add_argument("--service", help="only this service.name")
    rollouts.add_argument("--agent", help="only rollouts in which this agent made a span")
    rollouts.add_argument("--task", help="only this task id")
    rollouts.add_argument("--since", metavar="ISO", help="started at or after this time (UTC)")
    rollouts.add_argument("--until", metavar="ISO", help="started before this time (UTC)")
    rollouts.add_argument("--resources", metavar="ID", help="only rollouts run with this resources id")
    rollouts.add_argument("--min-rewards", type=int, default=0, help="at least this many rewards")
    rollouts.add_argument("--format", choices=["pretty", "json"], default="pretty")
    _store_argument(rollouts)
    rollouts.set_defaults(func=_cmd_rollouts)

    show = subparsers.add_parser(
        "show", help="print a rollout's span tree, LLM calls, rewards and errors marked"
    )
    show.add_argument("rollout_id")
    _store_argument(show)
    show.set_defaults(func=_cmd_show)
