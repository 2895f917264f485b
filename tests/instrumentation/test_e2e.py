"""End to end: an instrumented agent exports real OTLP to a running `lightspan collector`, and
`lightspan show ROLLOUT_ID` prints the rollout's tree from the store.

The collector is the real one (`lightspan collector`, embedded chDB store in tmp_path, OTLP ports
and SQL endpoint on ephemeral loopback ports read from its banner); the agent is a plain OpenAI SDK
agent in a fresh interpreter against tests/fake_openai.py, exporting over OTLP/gRPC and, in a second
case, OTLP/HTTP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT

LIGHTSPAN = [sys.executable, "-m", "lightspan.cli"]


AGENT = """
    import lightspan, openai
    from tests.helpers.fake_openai import FakeOpenAI, ToolCall

    lightspan.instrument(service_name="e2e-agent", endpoint={endpoint!r}, protocol={protocol!r},
                         frameworks=["openai"], request_token_ids=True)
    with FakeOpenAI(script=[ToolCall("add", {{"a": 2, "b": 2}}), "The answer is 4."]) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="k")
        with lightspan.rollout("e2e-task", rollout_id={rollout_id!r}):
            messages = [{{"role": "user", "content": "What is 2 + 2?"}}]
            client.chat.completions.create(model="fake-model", messages=messages)
            lightspan.emit_reward(0.25, name="tool_used")
            client.chat.completions.create(model="fake-model", messages=messages)
            lightspan.emit_reward(1.0, final=True)
    # no flush: instrument() flushes at interpreter exit, acknowledged only after commit
"""


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_agent_traces_reach_collector_and_show_prints_the_tree(collector_process, protocol):
    rollout_id = f"e2e-{protocol.replace('/', '-')}"
    endpoint = collector_process.grpc_endpoint if protocol == "grpc" else collector_process.http_endpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LIGHTSPAN_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = textwrap.dedent(AGENT.format(endpoint=endpoint, protocol=protocol, rollout_id=rollout_id))
    app = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert app.returncode == 0, app.stderr

    show = subprocess.run(
        [*LIGHTSPAN, "show", rollout_id, "--store", collector_process.sql_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert show.returncode == 0, show.stderr
    out = show.stdout
    assert rollout_id in out and "(5 spans)" in out, out
    lines = out.splitlines()
    tree = [
        line for line in lines if re.search(r"lightspan\.rollout|chat fake-model|lightspan\.reward", line)
    ]
    assert [re.sub(r"^[\s│├└─]+", "", t).split()[0] for t in tree] == [
        "lightspan.rollout",
        "chat",
        "lightspan.reward",
        "chat",
        "lightspan.reward",
    ], out
    assert sum("[LLM]" in line for line in lines) == 2
    assert any("reward 0.25" in line for line in lines) and any("reward 1" in line for line in lines), out
