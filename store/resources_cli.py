"""`lightspan resources list|show|publish|route|promote|rollback|compare`: versions and routes.

Every change is one appended row in `resource_routes` (see `store.routing`); bad input (an unknown
name or version, weights that do not add up to 1, nothing to roll back to) is refused before
anything is written, as a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lightspan.errors import InvalidInput
from lightspan.store.cli import _open, _store_argument, _time, compact_table

_PREVIEW = 60  # characters of a prompt shown in a table


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _PREVIEW else flat[: _PREVIEW - 1] + "…"


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _open(args) as store:
        resources = store.resources()
        names = list(dict.fromkeys(r.name for r in resources))
        routes = {name: store.route(name) for name in names}
    table = Table("name", "kind", "versions", "latest", "route")
    for name in names:
        versions = [r for r in resources if r.name == name]
        table.add_row(
            name, versions[-1].kind, str(len(versions)), str(versions[-1].version), routes[name].describe()
        )
    Console().print(table)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    with _open(args) as store:
        route = store.route(args.name)
        history = store.routes(args.name)
        versions = store.resources(args.name)
    console = Console()
    console.print(f"{args.name}: {versions[-1].kind}, {len(versions)} versions; route {route.describe()}")
    # 80 columns: the uri in full (folded, never cut: it is what a user copies), metadata on a line below.
    table = compact_table()
    for column in ("version", "created (UTC)", "share"):
        table.add_column(column, no_wrap=True)
    table.add_column("content or uri", overflow="fold")
    shares = dict(route.split)
    for r in versions:
        share = shares.get(r.version)
        described = _preview(r.content) if r.kind == "prompt" else r.uri
        table.add_row(
            str(r.version),
            r.created.strftime("%m-%d %H:%M") if r.created else "",
            "" if share is None else f"{share:.0%}",
            "\n".join(filter(None, [described, _metadata_line(r.metadata)])),
        )
    console.print(table)
    console.print("route history:")
    for row in history:
        created = row.created.strftime("%Y-%m-%d %H:%M:%S") if row.created else ""
        console.print(f"  #{row.seq} {created} {row.action}: {row.shares}")
    return 0


def _metadata_line(metadata: dict[str, Any]) -> str:
    """A version's metadata in one line: its plain values, and the names of the nested ones (a
    checkpoint's training metrics, a prompt's scores) that `Store.resources` returns in full."""
    plain = [f"{key}={value}" for key, value in metadata.items() if not isinstance(value, dict | list)]
    nested = [key for key, value in metadata.items() if isinstance(value, dict | list)]
    return " ".join(plain + ([f"(also: {', '.join(nested)})"] if nested else []))


def _cmd_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.prompt_file is not None:
        try:
            content = Path(args.prompt_file).read_text()
        except OSError as error:
            raise InvalidInput(f"cannot read {args.prompt_file}: {error.strerror}") from None
    else:
        content = args.prompt or ""
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except ValueError as error:
        raise InvalidInput(f"--metadata is not JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise InvalidInput('--metadata must be a JSON object, e.g. \'{"made_by": "alice"}\'')
    kind = "checkpoint" if args.checkpoint is not None else "prompt"
    with _open(args) as store:
        published = store.publish_resource(
            args.name, kind, uri=args.checkpoint or "", content=content, metadata=metadata
        )
        route = store.route(args.name)
    print(f"published {published.id}; route is {route.describe()}")
    return 0


def _print_route(verb: str, route) -> None:
    print(f"{route.name}: {verb}; route is now {route.describe()}")


def _cmd_route(args: argparse.Namespace) -> int:
    versions, weights = args.version or [], args.weight or []
    if len(versions) != len(weights):
        raise InvalidInput(
            f"give one --weight per --version ({len(versions)} versions, {len(weights)} weights)"
        )
    with _open(args) as store:
        route = store.set_route(args.name, list(zip(versions, weights)))
    _print_route("routed", route)
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    with _open(args) as store:
        route = store.promote(args.name, args.version)
    _print_route(f"promoted version {args.version}", route)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _open(args) as store:
        route = store.rollback(args.name)
    _print_route(f"rolled back to version {route.primary}", route)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _open(args) as store:
        comparison = store.compare_versions(args.name, since=_time(args.since))
    console = Console()
    if not comparison.versions:
        console.print(f"no rollout with a reward recorded a version of {args.name!r} yet")
        return 0
    table = Table(
        "version", "rollouts", "mean", "95% interval", f"p vs {comparison.reference}", "significant"
    )
    for v in comparison.versions:
        interval = "" if v.low is None or v.high is None else f"{v.low:.3f} to {v.high:.3f}"
        if v.version == comparison.reference:
            p_value, significant = "reference", ""
        elif v.p_value is None:
            p_value, significant = "", "too few rollouts"
        else:
            p_value, significant = f"{v.p_value:.3g}", "yes" if v.significant else "no"
        table.add_row(str(v.version), str(v.count), f"{v.mean:.3f}", interval, p_value, significant)
    console.print(table)
    console.print("final rewards; normal approximation (Welch's test, significant at p < 0.05)")
    if comparison.small:
        console.print("a version with fewer than 30 rollouts has too narrow an interval")
    if args.plot:
        _plot(comparison, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _plot(comparison, path: str) -> None:
    """Mean reward per version with its 95% interval, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = comparison.versions
    labels = [f"v{v.version}\n(n={v.count})" for v in versions]
    means = [v.mean for v in versions]
    errors = [
        [v.mean - v.low if v.low is not None else 0.0 for v in versions],
        [v.high - v.mean if v.high is not None else 0.0 for v in versions],
    ]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(versions) + 2), 4))
    colors = ["tab:gray" if v.version == comparison.reference else "tab:blue" for v in versions]
    axes.bar(labels, means, yerr=errors, capsize=6, color=colors)
    axes.set_ylabel("mean final reward (95% interval)")
    axes.set_title(f"{comparison.name}: reward per version (grey: reference)")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise InvalidInput(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)


def register(subparsers: argparse._SubParsersAction) -> None:
    resources = subparsers.add_parser(
        "resources",
        help="list resource versions, route traffic between them, promote, roll back, compare rewards",
        description="Versions of prompts and checkpoints, and the routes that decide which version a "
        "rollout gets (default: the latest). Every change is an appended row.",
    )
    actions = resources.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="every resource: kind, versions, route")
    _store_argument(listing)
    listing.set_defaults(func=_cmd_list)

    show = actions.add_parser("show", help="one resource's versions, its route and the route's history")
    show.add_argument("name")
    _store_argument(show)
    show.set_defaults(func=_cmd_show)

    publish = actions.add_parser(
        "publish",
        help="append the next version of a prompt or a checkpoint",
        description="Append the next version of NAME. A prompt is a str.format template with named "
        "placeholders ({question}), checked here; a checkpoint is the URI of a Hugging Face folder.",
    )
    publish.add_argument("name")
    what = publish.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="the prompt template")
    what.add_argument("--prompt-file", metavar="FILE", help="read the prompt template from FILE")
    what.add_argument("--checkpoint", metavar="URI", help="a checkpoint's folder or URI")
    publish.add_argument(
        "--metadata", metavar="JSON", help='a JSON object, e.g. \'{"parent": 3, "made_by": "alice"}\''
    )
    _store_argument(publish)
    publish.set_defaults(func=_cmd_publish)

    route = actions.add_parser(
        "route",
        help="split traffic: a canary (one --version with a --weight below 1) or an A/B split",
        description="One --version/--weight pair below 1 is a canary: that version gets the weight and "
        "the current route's other versions share the rest. Several pairs are the whole split and "
        "their weights must add up to 1. A rollout is routed by a hash of its id, so it sees one "
        "version throughout.",
    )
    route.add_argument("name")
    route.add_argument("--version", type=int, action="append", required=True, help="a version (repeatable)")
    route.add_argument(
        "--weight",
        type=float,
        action="append",
        required=True,
        help="its share of rollouts in (0, 1] (repeatable)",
    )
    _store_argument(route)
    route.set_defaults(func=_cmd_route)

    promote = actions.add_parser("promote", help="send every rollout to one version")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    _store_argument(promote)
    promote.set_defaults(func=_cmd_promote)

    rollback = actions.add_parser(
        "rollback",
        help="pin the version promoted before the latest promotion",
        description="Pins the version promoted before the latest promotion (a second rollback goes one "
        "promotion further back). With no promotion on record it pins the version below the newest one "
        "the route sends traffic to (dropping a canary, or undoing the latest version).",
    )
    rollback.add_argument("name")
    _store_argument(rollback)
    rollback.set_defaults(func=_cmd_rollback)

    compare = actions.add_parser(
        "compare", help="per version: mean final reward, rollouts, 95%% interval, significance"
    )
    compare.add_argument("name")
    compare.add_argument("--since", metavar="ISO", help="only rollouts started at or after this time (UTC)")
    compare.add_argument("--plot", metavar="FILE", help="also write a PNG of the means and intervals")
    _store_argument(compare)
    compare.set_defaults(func=_cmd_compare)
