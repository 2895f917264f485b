"""Trace an agent app with OpenTelemetry: rewards, rollouts, agents and exact token ids.

Imports only OpenTelemetry and the standard library (plus `wrapt`, an OpenTelemetry
instrumentation dependency), so an agent app never pulls torch, chDB or ClickHouse clients.

    import lightspan
    lightspan.instrument()                      # OTLP to the collector, frameworks auto-detected
    with lightspan.rollout(task_id="t1"):
        answer = my_agent(...)
        lightspan.emit_reward(1.0)
"""

from lightspan.instrumentation.context import NestedRolloutError, agent, current_agent, current_rollout
from lightspan.instrumentation.episodes import Rollout, rollout
from lightspan.instrumentation.resources import resource
from lightspan.instrumentation.rewards import emit_action, emit_exception, emit_observation, emit_reward
from lightspan.instrumentation.setup import Instrumentation, instrument

__all__ = [
    "Instrumentation",
    "NestedRolloutError",
    "Rollout",
    "agent",
    "current_agent",
    "current_rollout",
    "emit_action",
    "emit_exception",
    "emit_observation",
    "emit_reward",
    "instrument",
    "resource",
    "rollout",
]
