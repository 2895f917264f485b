"""The Helm chart, checked without Helm (none is installed here): every value a template reads
exists, the commands it runs take the flags it passes, the collector it runs is configured as
`lightspan collector` is by default, and its trainer config is valid."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml

from lightspan.cli import build_parser
from lightspan.collector.cli import config_from_args
from lightspan.collector.config import CollectorConfig
from lightspan.errors import InvalidInput
from lightspan.trainer.config import from_dict
from tests.helpers import ROOT
from tests.helpers.processes import run_cli

CHART = ROOT / "charts" / "lightspan"
TEMPLATES = sorted((CHART / "templates").glob("*"))
# values.collector keys for Kubernetes itself, not passed to the collector as flags.
KUBERNETES_ONLY = {"replicas", "resources", "authTokenSecret"}


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "lightspan" and chart["version"]


def test_every_value_a_template_reads_is_defined():
    values = _values()
    used = {m for t in TEMPLATES for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", t.read_text())}
    assert used
    for path in used:
        node = values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f".Values.{path} is not in values.yaml"
            node = node[key]


def test_collector_flags_exist():
    text = (CHART / "templates" / "collector.yaml").read_text()
    flags = set(re.findall(r"(?<![-\w])(--[a-z][a-z-]*)", text))
    help_text = run_cli("collector", "--help").stdout
    assert flags and all(flag in help_text for flag in flags), flags


def _value(path: str) -> Any:
    node = _values()
    for key in path.split("."):
        node = node[key]
    return node


def _collector_args(**collector: Any) -> tuple[list[str], set[str]]:
    """The collector container's args as Helm renders them with values.yaml (values.collector keys
    replaced by `collector`), and the values.collector keys they read. Renders `{{ .Values.x }}` and
    `{{ if [not] .Values.x }}...{{ end }}`, the only template forms the args use."""
    text = (CHART / "templates" / "collector.yaml").read_text()
    match = re.search(r"^\s*args: (\[.*?\])$", text, re.MULTILINE | re.DOTALL)
    assert match, "no args list in templates/collector.yaml"
    template = match.group(1)
    used = set(re.findall(r"\.Values\.collector\.(\w+)", template))

    def value(path: str) -> Any:
        key = path.removeprefix("collector.")
        return collector[key] if path.startswith("collector.") and key in collector else _value(path)

    rendered = re.sub(
        r"\{\{\s*if (not )?\.Values\.([\w.]+)\s*\}\}(.*?)\{\{\s*end\s*\}\}",
        lambda m: m.group(3) if bool(value(m.group(2))) != bool(m.group(1)) else "",
        template,
        flags=re.DOTALL,
    )
    rendered = re.sub(r"\{\{\s*\.Values\.([\w.]+)\s*\}\}", lambda m: str(value(m.group(1))), rendered)
    assert "{{" not in rendered, rendered
    return [str(arg) for arg in yaml.safe_load(rendered)], used


def test_the_chart_runs_the_collector_with_its_own_defaults(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LIGHTSPAN_AUTH_TOKEN", raising=False)  # the chart sets it from a Secret
    argv, used = _collector_args()
    assert argv[0] == "collector"
    config = config_from_args(build_parser().parse_args(argv))  # valid, or InvalidInput says why
    # What a pod needs otherwise: every address, and no SQL endpoint (the store is a ClickHouse
    # server, given as LIGHTSPAN_STORE).
    assert (config.host, config.sql_port, config.store_url) == ("0.0.0.0", None, None)
    # Without a token Secret, listening on every address is declared meant (--insecure).
    assert config.insecure and config.auth_token is None
    # Every tunable the chart passes from values.yaml is the collector's own default, so a chart
    # install runs the collector `lightspan collector` is (its defaults are tuned, see the README).
    defaults = CollectorConfig.standalone()
    assert (
        dataclasses.replace(config, host=defaults.host, sql_port=defaults.sql_port, insecure=False)
        == defaults
    )
    # And every collector value is either passed to it or used by Kubernetes.
    assert used - {"authTokenSecret"} == set(_values()["collector"]) - KUBERNETES_ONLY


def test_the_chart_with_a_token_secret_runs_the_collector_secure(monkeypatch: pytest.MonkeyPatch):
    argv, _ = _collector_args(authTokenSecret="collector-token")
    assert "--insecure" not in argv
    # The pod gets the token from the Secret as LIGHTSPAN_AUTH_TOKEN, which the flag defaults to.
    monkeypatch.setenv("LIGHTSPAN_AUTH_TOKEN", "from-the-secret")
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.auth_token, config.insecure) == ("from-the-secret", False)
    # Without the token the same arguments are refused: 0.0.0.0 with no token and no --insecure.
    monkeypatch.delenv("LIGHTSPAN_AUTH_TOKEN")
    with pytest.raises(InvalidInput, match="refusing to listen on 0.0.0.0 without an auth token"):
        config_from_args(build_parser().parse_args(argv))


def test_trainer_command_and_config_are_valid():
    text = (CHART / "templates" / "trainer.yaml").read_text()
    assert "--module, lightspan.trainer" in text and "--follow" in text
    config = from_dict(_values()["trainer"]["config"])
    assert config.model.path and config.output.resource_name == "policy"
    config.validate(world_size=1)
