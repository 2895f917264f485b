"""A support bot in production, traced with Lightspan: the app of README's "From production traffic".

Every request is a new conversation: a rollout whose id is the conversation's, so no task ever
repeats. The reply comes from whichever version of the `policy` checkpoint the route gives this
conversation (`lightspan.resource("policy")`, served side by side by `lightspan serve --resource
policy`); the user's thumbs-up or -down arrives later, from another process, as a reward span that
carries only the conversation id (`lightspan.emit_reward(..., rollout_id=...)`).

The users are simulated, and say so: they ask where their order is, and give a thumbs-up to a
brief reply (at most `BRIEF` characters), a thumbs-down to anything longer. Brevity is a feature of
the response a model can learn, the way politeness or a solved ticket is in a real app.

    python examples/support_bot.py answer --requests 200 --out day1.jsonl   # the users ask
    python examples/support_bot.py feedback day1.jsonl                     # their verdicts, later

The endpoints are the standard variables: `OPENAI_BASE_URL` (default `lightspan serve`'s
http://127.0.0.1:8000/v1) and the `OTEL_EXPORTER_OTLP_*` ones (default `lightspan up`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

import lightspan

SERVICE = "support-bot"
FEEDBACK_SERVICE = "feedback-api"
RESOURCE = "policy"
SYSTEM = "You are a support agent. Answer the customer briefly."
BRIEF = 48  # characters: the simulated users' idea of a brief reply


def answer(client: openai.OpenAI, question: str, conversation_id: str, max_tokens: int) -> dict[str, object]:
    """One request: one rollout, answered by the version the route gives this conversation."""
    with lightspan.rollout(conversation_id, rollout_id=conversation_id):
        policy = lightspan.resource(RESOURCE)  # this conversation's version, recorded on its spans
        response = client.chat.completions.create(
            model=f"{RESOURCE}:{policy.version}",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=max_tokens,
        )
    return {
        "conversation": conversation_id,
        "version": policy.version,
        "reply": response.choices[0].message.content or "",
    }


def verdict(reply: str) -> float:
    """The simulated user's feedback: 1 for a brief reply, 0 otherwise."""
    return 1.0 if len(reply.strip()) <= BRIEF else 0.0


def _answer(args: argparse.Namespace) -> None:
    tracing = lightspan.instrument(service_name=SERVICE)
    rng = random.Random(args.seed)
    questions = [
        (f"Where is my order A{rng.randrange(10_000, 99_999)}?", f"conv-{uuid.uuid4().hex[:12]}")
        for _ in range(args.requests)
    ]
    client = openai.OpenAI(  # one client, its connection pool shared by every request
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
    )
    with ThreadPoolExecutor(args.concurrency) as pool:  # a server handles its users at once
        rows = list(pool.map(lambda qc: answer(client, *qc, args.max_tokens), questions))
    tracing.force_flush()
    with open(args.out, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    versions = Counter(f"{RESOURCE}:{row['version']}" for row in rows)
    print(
        f"{len(rows)} conversations answered ({', '.join(f'{v} {n}' for v, n in sorted(versions.items()))})"
    )


def _feedback(args: argparse.Namespace) -> None:
    tracing = lightspan.instrument(service_name=FEEDBACK_SERVICE)
    rows = [json.loads(line) for line in Path(args.conversations).read_text(encoding="utf-8").splitlines()]
    verdicts = [verdict(str(row["reply"])) for row in rows]
    for row, value in zip(rows, verdicts):
        lightspan.emit_reward(value, name="thumbs_up", rollout_id=row["conversation"])
    tracing.force_flush()
    print(f"{len(rows)} verdicts sent, {sum(verdicts):.0f} thumbs-up")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("answer", help="simulated users ask; write conversation ids and replies")
    ask.add_argument("--requests", type=int, default=100, help="conversations (default: %(default)s)")
    ask.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    ask.add_argument("--max-tokens", type=int, default=24, help="reply length cap (default: %(default)s)")
    ask.add_argument("--seed", type=int, default=0, help="seeds the questions (default: %(default)s)")
    ask.add_argument("--out", required=True, help="JSONL of conversation, version, reply")
    tell = commands.add_parser("feedback", help="send each conversation's thumbs-up or -down, later")
    tell.add_argument("conversations", help="the JSONL that `answer` wrote")
    args = parser.parse_args(argv)
    {"answer": _answer, "feedback": _feedback}[args.command](args)


if __name__ == "__main__":
    main()
