"""The library versions Lightspan's OpenAI token-id hook instruments (OpenTelemetry's convention).

`OpenAITokenIdsInstrumentor.instrumentation_dependencies()` returns these, so `instrument()` checks
the installed `openai` against them before patching: the hook wraps `openai._base_client`'s
request methods and reads `Stream._iterator`, internals this range has and that the tests cover.
The floor is the `[openai]` extra's in pyproject.toml.
"""

_instruments = ("openai >= 1.50",)
