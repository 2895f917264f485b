"""Which LLM calls of an episode are one growing conversation, to be trained as one sequence.

A multi-turn agent usually sends each call the whole conversation so far: call k's prompt is
call k-1's prompt and response, followed by what happened in between (a tool result, an
observation, the user's next message). Training such calls one by one encodes that shared prefix
again for every call, so an episode of n turns costs O(n²) tokens. Trained as one sequence, the
prefix is encoded once, every call's response tokens carry that call's own advantage, and the
tokens in between are masked out of the loss (the model did not sample them), as Agent
Lightning v1 does by default. Under token aggregation the loss and its gradients are the same
as training the calls separately.

The test is on token ids, the only form in which "is a prefix of" means what the model saw:
calls are merged only when both have recorded ids and the later prompt starts with the earlier
prompt + response exactly (a chat template that renders an earlier turn differently, or a
re-tokenised call, keeps its calls apart). Only calls of the same rollout and agent chain.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightspan.types import Transition


def chains(transitions: Sequence[Transition], max_length: int | None = None) -> list[list[Transition]]:
    """The transitions grouped into chains of consecutive calls that extend each other, in order.

    Each chain is one training sequence: its last call's prompt + response holds every earlier
    call's prompt and response at the same positions. A chain is cut where the next call does
    not extend it, where ids are missing, or where the merged sequence would exceed `max_length`
    tokens. Transitions keep their order within and across chains (each chain sits where its
    first call was).
    """
    open_chains: dict[tuple[str, str], list[Transition]] = {}
    out: list[list[Transition]] = []
    for transition in transitions:
        key = (transition.rollout_id, transition.agent_name)
        chain = open_chains.get(key)
        if chain is not None and extends(chain[-1], transition, max_length):
            chain.append(transition)
            continue
        chain = [transition]
        out.append(chain)
        open_chains[key] = chain
    return out


def extends(previous: Transition, following: Transition, max_length: int | None = None) -> bool:
    """Whether `following`'s prompt starts with `previous`'s prompt + response (recorded ids only)."""
    if previous.needs_tokenization or following.needs_tokenization or following.step <= previous.step:
        return False
    assert previous.prompt_token_ids is not None and previous.response_token_ids is not None
    assert following.prompt_token_ids is not None and following.response_token_ids is not None
    before = len(previous.prompt_token_ids) + len(previous.response_token_ids)
    prompt = following.prompt_token_ids
    if len(prompt) < before or (
        max_length is not None and len(prompt) + len(following.response_token_ids) > max_length
    ):
        return False
    return (
        prompt[: len(previous.prompt_token_ids)] == previous.prompt_token_ids
        and prompt[len(previous.prompt_token_ids) : before] == previous.response_token_ids
    )
