"""Agents for the closed-loop tests. Runner processes import them by name (multiprocessing spawn),
so they live in a module, as users' agents must."""

from __future__ import annotations

import openai

import lightspan


@lightspan.rollout
def short_answer_agent(task, llm):
    """One chat call to the model being trained; reward 1 for a reply that starts with a vowel."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    reply = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": task["question"]}],
        max_tokens=4,
        temperature=1.0,
    )
    text = (reply.choices[0].message.content or "").strip().lower()
    return 1.0 if text[:1] in set("aeiou") else 0.0


def crashing_agent(task, llm):
    """Raises on every task whose id ends in 'boom', hangs on 'hang', else returns 0.5 (undecorated)."""
    if task["id"].endswith("boom"):
        raise RuntimeError("the tool exploded")
    if task["id"].endswith("hang"):
        import time

        time.sleep(3600)
    return 0.5


@lightspan.rollout
def prompted_capital_agent(task, llm, system_prompt):
    """The prompt search's agent: the candidate template (a keyword argument, named in the
    signature) filled with the question is the one message; reward 1 for the exact city."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    reply = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": system_prompt.format(question=task["question"])}],
        max_tokens=16,
    )
    return 1.0 if (reply.choices[0].message.content or "").strip() == task["answer"] else 0.0


def resource_echo_agent(task, llm, **resources):
    """Returns 1.0 when it was given a `greeting` resource that is a prompt template (undecorated)."""
    template = resources.get("greeting")
    return 1.0 if template is not None and template.format(name="x") == "hello x" else 0.0


def plain_agent(task, llm):
    """Takes no resource: `fit` passes it none."""
    return 0.25


@lightspan.rollout
def first_version_agent(task, llm):
    """Reward 1 when the version that answered (the response's `model`) is policy:1, else 0: every
    later version validates worse, so a promotion gate keeps each of them out."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    reply = client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": task["question"]}], max_tokens=2
    )
    return 1.0 if reply.model == "policy:1" else 0.0
