"""Multi-turn episodes trained as one sequence: same loss and gradients, each call's own advantage.

A 4-turn episode whose calls each send the whole conversation so far (recorded token ids, as an
inference engine returns them), with tool results between the turns and a different advantage
per turn. Trained as one merged sequence or as four separate calls, under token aggregation the
PPO-clip loss and every parameter's gradient agree within float tolerance; and in the merged
sequence, each response token carries its own turn's advantage while the tool results carry no
loss at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightspan.algorithms import losses
from lightspan.trainer.data import collate, to_samples
from lightspan.types import Transition

ADVANTAGES = [1.0, -2.0, 0.5, 3.0]


def four_turn_episode() -> list[Transition]:
    """Prompt ids grow by the previous response and a tool result; logprobs recorded per token."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 60, (6,), generator=generator).tolist()
    calls = []
    for step, advantage in enumerate(ADVANTAGES):
        response = torch.randint(5, 60, (3 + step,), generator=generator).tolist()
        logprobs = (-torch.rand(len(response), generator=generator) * 2).tolist()
        calls.append(
            Transition(
                "r",
                "t",
                f"s{step}",
                [],
                {},
                step=step,
                prompt_token_ids=list(prompt),
                response_token_ids=response,
                response_logprobs=logprobs,
                advantage=advantage,
            )
        )
        tool_result = torch.randint(5, 60, (4,), generator=generator).tolist()
        prompt = prompt + response + tool_result
    return calls


def test_each_turn_s_advantage_lands_on_its_own_response_tokens_only() -> None:
    episode = four_turn_episode()
    samples, skipped = to_samples(episode, tokenizer=None, max_length=512)
    assert skipped == 0 and len(samples) == 1 and len(samples[0].segments) == 4
    batch = collate(samples, pad_id=0, rollout_ids={})
    for call, segment in zip(episode, samples[0].segments):
        positions = slice(segment.start - 1, segment.end - 1)  # position t predicts token t + 1
        assert batch.input_ids[0, segment.start : segment.end].tolist() == call.response_token_ids
        assert batch.mask[0, positions].tolist() == [1.0] * len(call.response_token_ids)
        assert batch.advantages[0, positions].tolist() == [call.advantage] * len(call.response_token_ids)
        assert batch.old_logprobs[0, positions].tolist() == pytest.approx(call.response_logprobs)
    # prompt and tool results: no loss, no advantage
    assert int(batch.mask.sum()) == sum(len(c.response_token_ids) for c in episode)
    assert torch.all(batch.advantages[batch.mask == 0] == 0)
    assert batch.old_known.tolist() == [True]
    separate, _ = to_samples(episode, tokenizer=None, max_length=512, merge_turns=False)
    assert (
        len(separate) == 4 and collate(separate, 0, {}).advantages.abs().sum() == batch.advantages.abs().sum()
    )


def _loss_and_grads(model: torch.nn.Module, samples: list) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    batch = collate(samples, pad_id=0, rollout_ids={})
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = losses.token_logprobs(logits, batch.input_ids[:, 1:])
    loss, _ = losses.ppo_clip(logprobs, batch.old_logprobs, batch.advantages, batch.mask, aggregation="token")
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_merged_sequence_has_the_per_call_loss_and_gradients(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.train(False)  # no dropout: the two passes must see the same function
    episode = four_turn_episode()
    merged, _ = to_samples(episode, tokenizer=None, max_length=512)
    separate, _ = to_samples(episode, tokenizer=None, max_length=512, merge_turns=False)
    assert len(merged) == 1 and len(separate) == 4
    merged_loss, merged_grads = _loss_and_grads(model, merged)
    separate_loss, separate_grads = _loss_and_grads(model, separate)
    assert merged_loss == pytest.approx(separate_loss, rel=1e-5, abs=1e-6)
    assert len(merged_grads) == len(separate_grads) > 0
    for a, b in zip(merged_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
