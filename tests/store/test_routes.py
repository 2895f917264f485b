"""Routes between resource versions: the pure rule (store.routing), its rows in real chDB, the
per-version reward comparison, and the `lightspan resources` commands with their bad input."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lightspan.store.store as store_module
from lightspan import semconv
from lightspan.cli import main
from lightspan.errors import InvalidInput, NotFound
from lightspan.store import Store, routing
from lightspan.store.compare import Z_95, compare_versions, welch_p
from tests.helpers.processes import run_cli
from tests.helpers.synthetic import rollout_spans

IDS = [f"rollout-{n}" for n in range(2000)]


# --- the rule ---------------------------------------------------------------------------------------
def test_a_ten_percent_canary_gets_ten_percent_of_rollouts_and_keeps_them_as_it_grows():
    ten = routing.Route("p", ((3, 0.9), (4, 0.1)))
    twenty = routing.Route("p", ((3, 0.8), (4, 0.2)))
    in_ten = {rid for rid in IDS if routing.choose(ten, rid) == 4}
    in_twenty = {rid for rid in IDS if routing.choose(twenty, rid) == 4}
    # Binomial(2000, 0.1): sd 13.4; 4 sd either side.
    assert abs(len(in_ten) - 200) < 54
    assert abs(len(in_twenty) - 400) < 72
    assert in_ten <= in_twenty  # a rollout in the canary stays in it when the canary grows
    # The same rollout always gets the same version.
    assert all(routing.choose(ten, rid) == routing.choose(ten, rid) for rid in IDS[:100])


def test_the_choice_is_the_same_in_another_process_with_another_hash_seed():
    """A stable hash, not Python's salted hash(): a collector replica, or the next collector after a
    restart, sends each rollout to the same version."""
    route = routing.Route("p", ((1, 0.5), (2, 0.5)))
    here = [routing.choose(route, rid) for rid in IDS[:200]]
    script = (
        "from lightspan.store import routing; "
        "r = routing.Route('p', ((1, 0.5), (2, 0.5))); "
        "print(','.join(str(routing.choose(r, f'rollout-{n}')) for n in range(200)))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        assert [int(v) for v in out.split(",")] == here
    assert 70 < here.count(2) < 130


def test_the_canary_of_one_resource_does_not_catch_the_same_rollouts_as_another():
    a = {rid for rid in IDS if routing.choose(routing.Route("a", ((1, 0.9), (2, 0.1))), rid) == 2}
    b = {rid for rid in IDS if routing.choose(routing.Route("b", ((1, 0.9), (2, 0.1))), rid) == 2}
    assert len(a & b) < 60  # independent: about 2000 x 0.1 x 0.1 = 20 in both


@given(
    weights=st.lists(st.integers(1, 1000), min_size=1, max_size=6),
    canary=st.one_of(st.floats(0.001, 1.0), st.just(1 - 1e-7)),
    rollout_id=st.text(max_size=40),
)
def test_every_route_is_a_whole_split_and_every_choice_one_of_its_versions(weights, canary, rollout_id):
    versions = list(range(1, len(weights) + 1))
    route = routing.Route("p", tuple((v, w / sum(weights)) for v, w in zip(versions, weights)), "route", 1)
    assert routing.choose(route, rollout_id) in route.versions
    newest = len(versions) + 1
    grown = routing.with_share(route, [*versions, newest], [(newest, canary)])
    assert math.isclose(sum(w for _, w in grown.split), 1.0)
    assert math.isclose(dict(grown.split)[newest], canary, abs_tol=routing.WEIGHT_TOLERANCE)
    assert [v for v, _ in grown.split] == sorted(v for v, _ in grown.split)
    assert routing.choose(grown, rollout_id) in grown.versions


def test_one_pair_is_a_canary_against_the_rest_of_the_current_route():
    versions = [1, 2, 3, 4]
    latest = routing.default_route("p", versions)
    assert latest.split == ((4, 1.0),)
    # The default route sends everything to 4: a canary of 4 puts the rest on the version below.
    assert routing.with_share(latest, versions, [(4, 0.1)]).split == ((3, 0.9), (4, 0.1))
    # A canary of 4 against a 50/50 split of 1 and 2: they keep their proportions of the rest.
    split = routing.Route("p", ((1, 0.5), (2, 0.5)), "route", 3)
    new = routing.with_share(split, versions, [(4, 0.2)])
    assert new.split == ((1, 0.4), (2, 0.4), (4, 0.2))
    assert (new.action, new.seq) == ("route", 4)
    # Several pairs are the whole split.
    assert routing.with_share(split, versions, [(2, 0.25), (3, 0.75)]).split == ((2, 0.25), (3, 0.75))
    assert routing.with_share(split, versions, [(2, 0.9), (3, 0.1)]).primary == 2


@pytest.mark.parametrize(
    ("shares", "error", "message"),
    [
        ([(3, 0.5), (4, 0.3)], InvalidInput, "weights add up to 0.8, not 1"),
        ([(3, 0.5), (4, 0.6)], InvalidInput, "weights add up to 1.1, not 1"),
        ([(9, 0.1)], NotFound, "has no version 9"),
        ([(4, 0.0)], InvalidInput, "not a share in"),
        ([(4, 1.5)], InvalidInput, "not a share in"),
        ([(4, float("nan"))], InvalidInput, "not a share in"),
        ([(4, 0.5), (4, 0.5)], InvalidInput, "given twice"),
        ([], InvalidInput, "at least one"),
    ],
)
def test_bad_splits_are_refused(shares, error, message):
    with pytest.raises(error, match=message):
        routing.with_share(routing.default_route("p", [3, 4]), [3, 4], shares)


def test_a_canary_needs_another_version_to_take_the_rest():
    with pytest.raises(InvalidInput, match="has only version 1"):
        routing.with_share(routing.default_route("p", [1]), [1], [(1, 0.5)])


def test_rollback_goes_back_one_promotion_at_a_time():
    versions = [1, 2, 3, 4]
    route = routing.default_route("p", versions)
    route = routing.promoted(route, versions, 2)
    route = routing.promoted(route, versions, 3)
    route = routing.with_share(route, versions, [(4, 0.1)])  # a canary on top of promoted 3
    assert route.promoted == (2, 3)
    back = routing.rolled_back(route, versions)
    assert (back.split, back.action, back.promoted) == (((2, 1.0),), "rollback", (2,))
    with pytest.raises(InvalidInput, match="no promotion before version 2"):
        routing.rolled_back(back, versions)


def test_without_promotions_rollback_undoes_the_newest_routed_version():
    versions = [1, 2, 3]
    latest = routing.default_route("p", versions)
    assert routing.rolled_back(latest, versions).split == ((2, 1.0),)
    canary = routing.with_share(latest, versions, [(3, 0.1)])
    once = routing.rolled_back(canary, versions)
    assert once.split == ((2, 1.0),)  # the canary dropped
    assert routing.rolled_back(once, versions).split == ((1, 1.0),)  # then one version further back
    with pytest.raises(InvalidInput, match="no version before 1"):
        routing.rolled_back(routing.Route("p", ((1, 1.0),), "rollback", 3), versions)


# --- the statistics -----------------------------------------------------------------------------------
def test_compare_versions_hand_computed():
    # v1: 0, 1, 1, 1 -> mean 0.75, sample var 0.25, se 0.25; v2: 0, 0, 0, 1 -> mean 0.25, se 0.25.
    result = compare_versions("p", {1: [0, 1, 1, 1], 2: [0, 0, 0, 1], 3: [1.0]}, primary=1)
    assert result.reference == 1
    one, two, three = result.versions
    assert (one.count, one.mean) == (4, 0.75)
    assert one.low == pytest.approx(0.75 - Z_95 * 0.25) and one.high == pytest.approx(0.75 + Z_95 * 0.25)
    assert one.p_value is None  # the reference
    # Welch: z = 0.5 / sqrt(0.25/4 + 0.25/4) = 1.4142; two-sided normal p = 0.1573.
    assert two.p_value == pytest.approx(0.157299, abs=1e-6) and two.significant is False
    assert (three.low, three.p_value, three.significant) == (None, None, None)  # one rollout: no spread
    assert result.small
    # The reference falls back to the version with most rollouts when the primary has none.
    assert compare_versions("p", {1: [1.0], 2: [0.0, 1.0]}, primary=9).reference == 2
    # Far apart with 100 each: significant.
    assert welch_p([1.0, 0.9] * 50, [0.0, 0.1] * 50) < 1e-9
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p([1.0, 1.0], [0.0, 0.0]) == 0.0


# --- in the store ----------------------------------------------------------------------------------------
def _publish(store: Store, name: str = "system_prompt", count: int = 3) -> None:
    for n in range(1, count + 1):
        store.publish_resource(name, "prompt", content=f"v{n}: answer {{question}}", metadata={"by": "test"})


def _route_rows(store: Store) -> int:
    return int(store.sql("SELECT count() FROM resource_routes").scalar())


def test_routes_are_append_only_rows_and_the_newest_is_the_route(store):
    _publish(store)
    assert store.route("system_prompt").split == ((3, 1.0),)
    store.set_route("system_prompt", [(3, 0.1)])
    store.promote("system_prompt", 2)
    store.set_route("system_prompt", [(3, 0.25)])
    assert store.route("system_prompt").split == ((2, 0.75), (3, 0.25))
    history = store.routes("system_prompt")
    assert [(r.seq, r.action, r.split) for r in history] == [
        (1, "route", ((2, 0.9), (3, 0.1))),
        (2, "promote", ((2, 1.0),)),
        (3, "route", ((2, 0.75), (3, 0.25))),
    ]
    assert all(r.created is not None for r in history)
    # The store's choice is the rule's choice.
    route = store.route("system_prompt")
    for rid in IDS[:50]:
        assert store.resource_for("system_prompt", rid).version == routing.choose(route, rid)
    assert store.resource_for("system_prompt", "x").content.startswith("v")


def test_a_prompt_is_checked_when_published(store):
    with pytest.raises(InvalidInput, match="placeholder"):
        store.publish_resource("system_prompt", "prompt", content="Answer {0}")
    assert store.resources("system_prompt") == []


def test_bad_route_changes_write_nothing(store):
    _publish(store, count=2)
    store.promote("system_prompt", 2)
    before = _route_rows(store)
    with pytest.raises(NotFound, match="no resource named 'nope'"):
        store.promote("nope", 1)
    with pytest.raises(NotFound, match="has no version 5"):
        store.promote("system_prompt", 5)
    with pytest.raises(InvalidInput, match="add up to"):
        store.set_route("system_prompt", [(1, 0.5), (2, 0.4)])
    with pytest.raises(InvalidInput, match="no promotion before version 2"):
        store.rollback("system_prompt")
    with pytest.raises(NotFound):
        store.resource("system_prompt", 7)
    assert _route_rows(store) == before


def test_routes_survive_a_migration_from_a_store_before_them(store_url, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:6])
        with Store.connect(store_url) as old:
            assert old.schema_version() == 6
            _publish(old, count=2)
            assert not old.sql("EXISTS TABLE resource_routes").scalar()
    with Store.connect(store_url) as s:
        assert s.schema_version() == s.latest_schema_version
        assert [r.version for r in s.resources("system_prompt")] == [1, 2]
        assert s.route("system_prompt").split == ((2, 1.0),)
        s.promote("system_prompt", 1)
        assert s.route("system_prompt").split == ((1, 1.0),)


def _rollout(rid: str, resources_id: str, reward: float, start_ns: int, *, root_without: str = ""):
    """A synthetic rollout; `root_without` gives the root span that resources id instead (a span
    started before `lightspan.resource(...)` was called)."""
    spans = rollout_spans(
        rollout_id=rid,
        task_id="t",
        question="1+1?",
        answer="2",
        reward=reward,
        start_ns=start_ns,
        resources_id=resources_id,
    )
    if root_without:
        spans[0].attributes[semconv.RESOURCES_ID] = root_without
    return spans


def test_compare_groups_final_rewards_by_the_version_each_rollout_recorded(store):
    _publish(store, count=2)
    now = time.time_ns()
    spans = []
    rewards = {1: [1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2: [0.0, 0.0, 1.0, 0.0]}
    n = 0
    for version, values in rewards.items():
        for value in values:
            spans += _rollout(
                f"r{n}", f"policy:7,system_prompt:{version}", value, now + n * 1000, root_without="policy:7"
            )
            n += 1
    spans += _rollout("other", "policy:7,other_prompt:1", 1.0, now)  # another resource: left out
    spans += _rollout("none", "", 1.0, now)
    store.insert_spans(spans)
    result = store.compare_versions("system_prompt")
    assert result.reference == 2  # the route's primary: the latest
    assert [(v.version, v.count, v.mean) for v in result.versions] == [
        (1, 6, pytest.approx(5 / 6)),
        (2, 4, pytest.approx(0.25)),
    ]
    assert result.versions[0].p_value == pytest.approx(welch_p(rewards[1], rewards[2]))
    assert store.compare_versions("system_prompt", since=_later()).versions == ()
    # A rollout that ran system_prompt:1 is also selected by its policy alone (the trainer's filter).
    ran = {r.rollout_id: r.resources_id for r in store.rollouts(resources_id="policy:7", limit=None)}
    assert ran["r0"] == "policy:7,system_prompt:1" and "other" in ran and "none" not in ran
    assert {r.rollout_id for r in store.rollouts(resources_id="system_prompt:2", limit=None)} == {
        "r6",
        "r7",
        "r8",
        "r9",
    }


def test_compare_counts_a_rollout_whose_ids_are_on_its_root_only(store):
    """A non-Python app sets the rollout's ids on the root span only (tests/fixtures/otlp_js): its
    reward span joins the rollout through the trace, in `compare` as in `rollouts()`."""
    _publish(store, count=2)
    now = time.time_ns()
    spans = _rollout("js-1", "system_prompt:2", 1.0, now) + _rollout("js-2", "system_prompt:2", 0.0, now + 1)
    for span in spans:
        if span.parent_span_id:
            for key in (semconv.ROLLOUT_ID, semconv.TASK_ID, semconv.ATTEMPT, semconv.RESOURCES_ID):
                span.attributes.pop(key, None)
    assert any(span.name == "lightspan.reward" and span.parent_span_id for span in spans)
    store.insert_spans(spans)
    (version,) = store.compare_versions("system_prompt").versions
    assert (version.version, version.count, version.mean) == (2, 2, pytest.approx(0.5))


def _later():
    from datetime import datetime, timedelta

    return datetime.now() + timedelta(days=1)


# --- the commands -----------------------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "nope"), "no resource named 'nope'"),
        (("route", "nope", "--version", "1", "--weight", "1"), "no resource named 'nope'"),
        (("route", "system_prompt", "--version", "9", "--weight", "0.1"), "has no version 9"),
        (
            (
                "route",
                "system_prompt",
                "--version",
                "1",
                "--weight",
                "0.5",
                "--version",
                "2",
                "--weight",
                "0.3",
            ),
            "weights add up to 0.8, not 1",
        ),
        (("route", "system_prompt", "--version", "1", "--version", "2", "--weight", "1"), "one --weight per"),
        (("route", "system_prompt", "--version", "1", "--weight", "2"), "not a share in"),
        (("promote", "system_prompt", "9"), "has no version 9"),
        (("promote", "nope", "1"), "no resource named 'nope'"),
        (("rollback", "nope"), "no resource named 'nope'"),
        (("compare", "nope"), "no resource named 'nope'"),
        (("compare", "system_prompt", "--since", "yesterday"), "not an ISO date/time"),
        (("publish", "system_prompt", "--prompt", "Answer {}"), "placeholder {} is not a name"),
        (("publish", "system_prompt", "--prompt", "x", "--metadata", "{bad"), "--metadata is not JSON"),
        (("publish", "system_prompt", "--prompt", "x", "--metadata", "[1]"), "must be a JSON object"),
        (("publish", "system_prompt", "--prompt-file", "/no/such/file"), "cannot read /no/such/file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(store, capsys, args, message):
    _publish(store, count=2)
    store.promote("system_prompt", 2)
    before = _route_rows(store)
    code, out, err = _cli(capsys, "resources", *args, "--store", str(store.url))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lightspan: error: ") and message in err, err
    assert _route_rows(store) == before
    assert [r.version for r in store.resources("system_prompt")] == [1, 2]


def test_route_promote_rollback_show_list_and_compare_from_the_command_line(store, capsys, tmp_path):
    url = str(store.url)
    (tmp_path / "v2.txt").write_text("v2: answer {question}")
    for args in (
        ("--prompt", "v1: answer {question}", "--metadata", '{"made_by": "alice"}'),
        ("--prompt-file", str(tmp_path / "v2.txt"), "--metadata", '{"parent": 1, "scores": {"t1": 0.5}}'),
        ("--prompt", "v3: answer {question}"),
    ):
        code, out, _ = _cli(capsys, "resources", "publish", "system_prompt", *args, "--store", url)
        assert code == 0 and "route is" in out
    assert "published system_prompt:3; route is 3 (100%); the default, latest version" in out
    assert store.resource("system_prompt", 2).metadata == {"parent": 1, "scores": {"t1": 0.5}}
    code, out, _ = _cli(capsys, "resources", "publish", "policy", "--checkpoint", "/ckpt/10", "--store", url)
    assert code == 0 and store.resource("policy", 1).uri == "/ckpt/10"
    code, out, _ = _cli(capsys, "resources", "promote", "system_prompt", "2", "--store", url)
    assert code == 0 and "route is now 2 (100%); promote #1" in out
    code, out, _ = _cli(
        capsys, "resources", "route", "system_prompt", "--version", "3", "--weight", "0.1", "--store", url
    )
    assert code == 0 and "route is now 2 (90%), 3 (10%); route #2" in out
    code, out, _ = _cli(capsys, "resources", "list", "--store", url)
    assert code == 0 and "system_prompt" in out and "2 (90%), 3 (10%)" in out
    code, out, _ = _cli(capsys, "resources", "show", "system_prompt", "--store", url)
    assert code == 0 and "v3:" in out and "#2" in out and "promote: 2 (100%)" in out
    assert max(map(len, out.splitlines())) <= 80, out
    code, out, _ = _cli(capsys, "resources", "promote", "system_prompt", "3", "--store", url)
    code, out, _ = _cli(capsys, "resources", "rollback", "system_prompt", "--store", url)
    assert code == 0 and "rolled back to version 2" in out
    assert store.route("system_prompt").split == ((2, 1.0),)

    now = time.time_ns()
    spans = []
    for n in range(40):
        version = 2 if n % 2 else 3
        spans += _rollout(
            f"c{n}", f"system_prompt:{version}", 1.0 if version == 3 else float(n % 4 == 1), now + n
        )
    store.insert_spans(spans)
    plot = tmp_path / "compare.png"
    code, out, _ = _cli(capsys, "resources", "compare", "system_prompt", "--plot", str(plot), "--store", url)
    assert code == 0, out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "20" in lines["2"] and "0.500" in lines["2"] and "reference" in lines["2"]
    assert "1.000" in lines["3"] and "yes" in lines["3"]
    assert "fewer than 30 rollouts has too narrow an interval" in out
    assert max(map(len, out.splitlines())) <= 80, out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_in_a_fresh_process(store_url):
    """The installed entry point, as a user runs it: a route change and its one-line refusal."""
    with Store.connect(store_url) as s:
        _publish(s, count=2)
    done = run_cli(
        "resources", "route", "system_prompt", "--version", "2", "--weight", "0.3", "--store", store_url
    )
    assert done.returncode == 0 and "1 (70%), 2 (30%)" in done.stdout, done.stderr
    refused = run_cli("resources", "promote", "system_prompt", "3", "--store", store_url)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "lightspan: error: resource 'system_prompt' has no version 3 (versions: 1, 2)"
    ]
    with Store.connect(store_url) as s:
        assert math.isclose(sum(w for _, w in s.route("system_prompt").split), 1.0)
