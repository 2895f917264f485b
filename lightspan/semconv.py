"""Every span and attribute name Lightspan writes or reads, in one place.

`instrumentation` writes these names, `store` extracts them in SQL and `algorithms` reads them
back from span trees; keeping them here means a rename is one edit, and the three components
cannot drift apart. Standard names are read in the three dialects users' instrumentors emit:
OpenTelemetry GenAI (current), the older OpenLLMetry indexed form, and OpenInference.
"""

from __future__ import annotations

import re

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

LLM_PROMPT_TOKEN_IDS = "lightspan.llm.prompt_token_ids"
LLM_RESPONSE_TOKEN_IDS = "lightspan.llm.response_token_ids"
LLM_RESPONSE_LOGPROBS = "lightspan.llm.response_logprobs"
LLM_ATTRIBUTE_PREFIX = "lightspan.llm."

# Environment variables that set rollout identity for a whole process (runners) and the store URL.
ENV_ROLLOUT_ID = "LIGHTSPAN_ROLLOUT_ID"
ENV_TASK_ID = "LIGHTSPAN_TASK_ID"
ENV_ATTEMPT = "LIGHTSPAN_ATTEMPT"
ENV_RESOURCES_ID = "LIGHTSPAN_RESOURCES_ID"
ENV_STORE = "LIGHTSPAN_STORE"

# Attributes stamped on every span started inside a rollout.
ROLLOUT_CONTEXT_ATTRIBUTES = (ROLLOUT_ID, TASK_ID, ATTEMPT, RESOURCES_ID)

# --- OpenTelemetry GenAI semantic conventions (current) -------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"
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
GEN_AI_EVALUATION_NAME = "gen_ai.evaluation.name"
GEN_AI_EVALUATION_SCORE = "gen_ai.evaluation.score.value"
# Operation names that denote one LLM call.
GEN_AI_LLM_OPERATIONS = ("chat", "text_completion", "generate_content")

# --- Older OpenLLMetry (Traceloop) indexed form ---------------------------------------------------
LEGACY_PROMPT_PREFIX = "gen_ai.prompt."
LEGACY_COMPLETION_PREFIX = "gen_ai.completion."
LEGACY_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
LEGACY_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
LEGACY_REQUEST_TYPE = "llm.request.type"
# gen_ai.prompt.{i}.role|content and gen_ai.completion.{i}.role|content|tool_calls...
LEGACY_MESSAGE_KEY = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")

# --- OpenInference -------------------------------------------------------------------------------
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
OPENINFERENCE_LLM_KIND = "LLM"
OPENINFERENCE_AGENT_KIND = "AGENT"
OI_MODEL_NAME = "llm.model_name"
OI_INPUT_PREFIX = "llm.input_messages."
OI_OUTPUT_PREFIX = "llm.output_messages."
OI_TOKEN_COUNT_PROMPT = "llm.token_count.prompt"
OI_TOKEN_COUNT_COMPLETION = "llm.token_count.completion"
OI_AGENT_NAME = "agent.name"
# llm.input_messages.{i}.message.role|content|...
OI_MESSAGE_KEY = re.compile(r"^llm\.(input|output)_messages\.(\d+)\.message\.(.+)$")

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
