"""The Helm chart, checked without Helm (none is installed here): every value a template reads
exists, the commands it runs take the flags it passes, and its trainer config is valid."""

from __future__ import annotations

import re

import yaml

from lightspan.trainer.config import from_dict
from tests.helpers import ROOT
from tests.helpers.processes import run_cli

CHART = ROOT / "charts" / "lightspan"
TEMPLATES = sorted((CHART / "templates").glob("*"))


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


def test_trainer_command_and_config_are_valid():
    text = (CHART / "templates" / "trainer.yaml").read_text()
    assert "--module, lightspan.trainer" in text and "--follow" in text
    config = from_dict(_values()["trainer"]["config"])
    assert config.model.path and config.output.resource_name == "policy"
    config.validate(world_size=1)
