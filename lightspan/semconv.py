"""Every span and attribute name Lightspan writes or reads, in one place.

`instrumentation` writes these names, `store` extracts them in SQL and `algorithms` reads them
back from span trees; keeping them here means a rename is one edit, and the three components
cannot drift apart. Standard names are read in the three dialects users' instrumentors emit:
OpenTelemetry GenAI (current), the older OpenLLMetry indexed form, and OpenInference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# --- Lightspan's own attributes -------------------------------------------------------------------
ROLLOUT_ID = "lightspan.rollout.id"
TASK_ID = "lightspan.task.id"
ATTEMPT = "lightspan.attempt"
AGENT_NAME = "lightspan.agent.name"
RESOURCES_ID = "lightspan.resources.id"

REWARD_SPAN = "lightspan.reward"
REWARD_VALUE = "lightspan.reward.value"
REWARD_NAME = "lightspan.reward.name"
# Set on a reward span to mark it as the rollout's final reward (overrides "last reward wins").
REWARD_FINAL = "lightspan.reward.final"

ACTION_SPAN = "lightspan.action"
OBSERVATION_SPAN = "lightspan.observation"
EXCEPTION_SPAN = "lightspan.exception"
ROLLOUT_SPAN = "lightspan.rollout"
PAYLOAD = "lightspan.payload"

# The rollout identity also travels as W3C baggage under the same names: `lightspan.rollout(...)`
# puts ROLLOUT_ID, TASK_ID, ATTEMPT and RESOURCES_ID in the baggage, so the services an agent
# calls (any language) receive them; Lightspan's span processor reads them back in a downstream
# Python service, and the stock BaggageSpanProcessor of any SDK copies them onto span attributes.
BAGGAGE_KEYS = (ROLLOUT_ID, TASK_ID, ATTEMPT, RESOURCES_ID)

LLM_PROMPT_TOKEN_IDS = "lightspan.llm.prompt_token_ids"
LLM_RESPONSE_TOKEN_IDS = "lightspan.llm.response_token_ids"
LLM_RESPONSE_LOGPROBS = "lightspan.llm.response_logprobs"

# Environment variables that set rollout identity for a whole process (runners) and the store URL.
ENV_ROLLOUT_ID = "LIGHTSPAN_ROLLOUT_ID"
ENV_TASK_ID = "LIGHTSPAN_TASK_ID"
ENV_ATTEMPT = "LIGHTSPAN_ATTEMPT"
ENV_RESOURCES_ID = "LIGHTSPAN_RESOURCES_ID"
ENV_STORE = "LIGHTSPAN_STORE"
# Where `lightspan.resource(name)` asks for versions (the collector's HTTP port), and the bearer
# token a collector started with `--auth-token` wants.
ENV_RESOURCES_URL = "LIGHTSPAN_RESOURCES_URL"
ENV_AUTH_TOKEN = "LIGHTSPAN_AUTH_TOKEN"

# --- OpenTelemetry GenAI semantic conventions (current) -------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_EVALUATION_EVENT = "gen_ai.evaluation.result"
GEN_AI_EVALUATION_SCORE = "gen_ai.evaluation.score.value"
# The tools offered to the call: a JSON list of {"type": "function", "name", "description", "parameters"}.
GEN_AI_TOOL_DEFINITIONS = "gen_ai.tool.definitions"
# Operation names that denote one LLM call.
GEN_AI_LLM_OPERATIONS = ("chat", "text_completion", "generate_content")

# --- Older OpenLLMetry (Traceloop) indexed form ---------------------------------------------------
LEGACY_PROMPT_PREFIX = "gen_ai.prompt."
LEGACY_COMPLETION_PREFIX = "gen_ai.completion."
LEGACY_REQUEST_TYPE = "llm.request.type"
# gen_ai.prompt.{i}.role|content and gen_ai.completion.{i}.role|content|tool_calls...
LEGACY_MESSAGE_KEY = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")

# --- OpenInference -------------------------------------------------------------------------------
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
OPENINFERENCE_LLM_KIND = "LLM"
OI_MODEL_NAME = "llm.model_name"
OI_INPUT_PREFIX = "llm.input_messages."
OI_OUTPUT_PREFIX = "llm.output_messages."
OI_AGENT_NAME = "agent.name"
# llm.input_messages.{i}.message.role|content|...
OI_MESSAGE_KEY = re.compile(r"^llm\.(input|output)_messages\.(\d+)\.message\.(.+)$")
# llm.tools.{i}.tool.json_schema: each tool offered, as the OpenAI `tools` entry in JSON.
OI_TOOL_KEY = re.compile(r"^llm\.tools\.(\d+)\.tool\.json_schema$")

# --- Agent Lightning (microsoft/agent-lightning), so an app instrumented for it trains unchanged ---
# Rewards are annotation spans whose `agentlightning.reward.{i}.name|value` attributes list named
# rewards; index 0 is the primary reward, the one Lightspan reads. The rollout and attempt ids are
# resource attributes of the tracer that ran the attempt.
AGL_ANNOTATION_SPAN = "agentlightning.annotation"
AGL_PRIMARY_REWARD_VALUE = "agentlightning.reward.0.value"
AGL_PRIMARY_REWARD_NAME = "agentlightning.reward.0.name"
AGL_ROLLOUT_ID = "agentlightning.rollout_id"
AGL_ATTEMPT_ID = "agentlightning.attempt_id"

# --- Rules, as data: `algorithms` evaluates them in Python, `store` renders them as SQL -------------
# Each rule below is written once. `is_llm_call` is the Python reading; store/schema.py generates the
# `rollout_spans` columns (`IsLLMCall`, `AgentName`, `Reward`...) from the same tuples, and
# tests/store/test_rules.py lands recorded span trees in chDB and checks both agree span by span.
# An attribute counts as present only with a non-empty value (ClickHouse reads a missing map key
# as '', so "absent" and "empty" are the same thing on the SQL side).


@dataclass(frozen=True)
class KindAttribute:
    """An attribute that names what a span is; when present it alone decides whether it is a call."""

    key: str
    llm_values: tuple[str, ...]


# The LLM-call rule, in order:
# 1. An explicit kind decides, first one present wins: `gen_ai.operation.name` (chat,
#    text_completion, generate_content; not invoke_agent / execute_tool / embeddings, whose spans
#    may carry messages too), then `openinference.span.kind` (LLM; not AGENT, CHAIN, TOOL...),
#    then OpenLLMetry's `llm.request.type` (chat, completion; not embedding or rerank). This is what
#    a user of each convention expects: the instrumentor said what the span is.
# 2. Without a kind, recorded response token ids or messages in any dialect (input or output, JSON
#    or indexed) make it a call: an instrumentor that records a model's messages records a call.
LLM_CALL_KINDS = (
    KindAttribute(GEN_AI_OPERATION_NAME, GEN_AI_LLM_OPERATIONS),
    KindAttribute(OPENINFERENCE_SPAN_KIND, (OPENINFERENCE_LLM_KIND,)),
    KindAttribute(LEGACY_REQUEST_TYPE, ("chat", "completion")),
)
LLM_CALL_KEYS = (LLM_RESPONSE_TOKEN_IDS, GEN_AI_INPUT_MESSAGES, GEN_AI_OUTPUT_MESSAGES)
LLM_CALL_KEY_PREFIXES = (LEGACY_PROMPT_PREFIX, LEGACY_COMPLETION_PREFIX, OI_INPUT_PREFIX, OI_OUTPUT_PREFIX)


def is_llm_call(attributes: Mapping[str, str]) -> bool:
    """The LLM-call rule above, over one span's attributes."""
    for kind in LLM_CALL_KINDS:
        value = attributes.get(kind.key)
        if value:
            return value in kind.llm_values
    if any(attributes.get(key) for key in LLM_CALL_KEYS):
        return True
    return any(value and key.startswith(LLM_CALL_KEY_PREFIXES) for key, value in attributes.items())


# The rollout rule. A span's own rollout id is `lightspan.rollout.id` (a span attribute, set by
# Lightspan's processor or copied from baggage by a BaggageSpanProcessor), else Agent Lightning's
# `agentlightning.rollout_id` resource attribute, followed by "/" and `agentlightning.attempt_id`
# when that is set (one Lightspan rollout is one episode: Agent Lightning retries a rollout as new
# attempts of the same rollout id). A span without one belongs to the rollout named on the spans of
# its trace, when they name exactly one (an agent in another language sets the ids on its root
# only); else (no span of the trace names one, or several do) to the trace itself, by its id.
# `own_rollout_id` is the first step in Python; store/schema.py renders it as SQL, and the store
# resolves the second step at read time from the `rollout_traces` table (see store/store.py).
ROLLOUT_ATTEMPT_SEPARATOR = "/"


def own_rollout_id(attributes: Mapping[str, str], resource_attributes: Mapping[str, str]) -> str:
    """The rollout a span names itself (see the rollout rule above), or "" when it names none."""
    explicit = attributes.get(ROLLOUT_ID)
    if explicit:
        return explicit
    agl = resource_attributes.get(AGL_ROLLOUT_ID)
    if not agl:
        return ""
    attempt = resource_attributes.get(AGL_ATTEMPT_ID)
    return f"{agl}{ROLLOUT_ATTEMPT_SEPARATOR}{attempt}" if attempt else agl


# A span's own agent: the first of these that is set (children without one inherit their parent's).
AGENT_KEYS = (AGENT_NAME, GEN_AI_AGENT_NAME, OI_AGENT_NAME)

# The reward rule. A span records a reward when it is one of REWARD_SPANS (a reward span: named
# REWARD_SPAN with its value in REWARD_VALUE, or Agent Lightning's annotation span with a primary
# reward value; at the span's start) and once per GEN_AI_EVALUATION_EVENT event that has a GEN_AI_EVALUATION_SCORE (at
# the event's time); either is marked final by REWARD_FINAL = REWARD_FINAL_TRUE (on the span, or on
# the event). Rewards are ordered by (time, span id, position), the reward span's own value before
# its events. The rollout's final reward is the last one marked final, else the last one: the one an
# evaluator records after the output it judges, and the one `@lightspan.rollout` marks from the
# agent's return value.
REWARD_FINAL_TRUE = "true"


@dataclass(frozen=True)
class RewardSpan:
    """A span name that records a reward, and the attribute holding its value.

    `required`: the span is a reward span even without the value (a Lightspan reward span without
    one is malformed); otherwise (an Agent Lightning annotation may carry only tags or links) it
    records a reward only when the value is set.
    """

    name: str
    value_key: str
    required: bool


REWARD_SPANS = (
    RewardSpan(REWARD_SPAN, REWARD_VALUE, required=True),
    RewardSpan(AGL_ANNOTATION_SPAN, AGL_PRIMARY_REWARD_VALUE, required=False),
)


def reward_value_key(name: str, attributes: Mapping[str, str]) -> str | None:
    """The attribute holding the value of the reward a span of this name records, or None."""
    for reward_span in REWARD_SPANS:
        if name == reward_span.name and (reward_span.required or attributes.get(reward_span.value_key)):
            return reward_span.value_key
    return None


def reward_order(final: bool, time_ns: int, span_id: str, position: int) -> tuple[bool, int, str, int]:
    """Sort key of one reward record: the greatest is the final reward (see the rule above).

    `position` is 0 for a reward span's own value and i (from 1) for its i-th event.
    """
    return (final, time_ns, span_id, position)


# --- Stored representation -----------------------------------------------------------------------
# otel_traces keeps the OpenTelemetry Collector ClickHouse exporter's spellings.
SPAN_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_CODES = ("Unset", "Ok", "Error")
STATUS_ERROR = "Error"
SERVICE_NAME = "service.name"

# --- Appended by instrumentation -----------------------------------------------------------------
# Name of the action / observation recorded by emit_action / emit_observation (the span is named
# ACTION_SPAN / OBSERVATION_SPAN so a query can select every action without a name list).
ACTION_NAME = "lightspan.action.name"
OBSERVATION_NAME = "lightspan.observation.name"
# "true" makes the zero-code instrumentor (opentelemetry-instrument) ask an OpenAI-compatible server
# for token ids and logprobs, as instrument(request_token_ids=True) does.
ENV_REQUEST_TOKEN_IDS = "LIGHTSPAN_REQUEST_TOKEN_IDS"

# --- Prompt search from production traces ------------------------------------------------------
# An app that records its task input as `lightspan.emit_observation("task", task)` (payload JSON)
# lets `lightspan optimize-prompt` replay the task through the agent function to score candidates.
TASK_OBSERVATION = "task"
