"""Losses (torch): PPO clip, KL estimators, SFT, and how tokens are weighed."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightspan.algorithms import losses
from lightspan.errors import InvalidInput


def test_import_algorithms_does_not_import_torch() -> None:
    code = "import lightspan.algorithms, sys; assert 'torch' not in sys.modules; lightspan.algorithms.prepare"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_logprobs_matches_log_softmax_with_temperature() -> None:
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    result = losses.token_logprobs(logits, torch.tensor([[1, 0]]))
    assert result.tolist()[0] == pytest.approx([-math.log(2), 2 - math.log(math.exp(2) + 1)])
    hot = losses.token_logprobs(logits, torch.tensor([[1, 0]]), temperature=2.0)
    assert hot.tolist()[0][1] == pytest.approx(1 - math.log(math.e + 1))


MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    ("aggregation", "rollouts", "expected"),
    [
        ("token", None, [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),
        ("sequence", None, [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0], [1 / 9, 1 / 9, 1 / 9]]),
        # Rollout 7 has two calls (each gets 1/4), rollout 9 one call (1/2).
        ("rollout", [7, 7, 9], [[1 / 8, 1 / 8, 0], [1 / 4, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),
    ],
)
def test_token_weights(aggregation: str, rollouts: list[int] | None, expected: list[list[float]]) -> None:
    index = None if rollouts is None else torch.tensor(rollouts)
    weights = losses.token_weights(MASK, aggregation, index)  # type: ignore[arg-type]
    assert weights.tolist() == [pytest.approx(row) for row in expected]


def test_token_weights_of_empty_masks_are_zero_and_bad_options_are_errors() -> None:
    empty = torch.zeros(2, 3)
    for aggregation, index in (("token", None), ("sequence", None), ("rollout", torch.tensor([0, 1]))):
        assert losses.token_weights(empty, aggregation, index).sum().item() == 0.0  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="rollout_index"):
        losses.token_weights(MASK, "rollout")
    with pytest.raises(InvalidInput, match="aggregation"):
        losses.token_weights(MASK, "batch")  # type: ignore[arg-type]


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    rows = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(0, 8), min_size=rows, max_size=rows))
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    rollouts = torch.tensor(draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows)))
    return mask, rollouts


@given(batches())
def test_rollout_aggregation_gives_each_rollout_equal_total_weight(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    mask, rollouts = batch
    weights = losses.token_weights(mask, "rollout", rollouts).double()
    totals = {int(r): weights[rollouts == r].sum().item() for r in rollouts.unique()}
    with_tokens = {int(r) for r in rollouts[mask.sum(-1) > 0].unique()}
    for rollout, total in totals.items():
        expected = 1 / len(with_tokens) if rollout in with_tokens else 0.0
        assert total == pytest.approx(expected, abs=1e-6)
    assert (weights[mask == 0] == 0).all()


def ratios_batch(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logprobs = torch.log(torch.tensor([ratios])).requires_grad_(True)
    return logprobs, torch.zeros(1, len(ratios)), torch.ones(1, len(ratios))


def test_ppo_clip_positive_advantage_hand_computed() -> None:
    logprobs, old, mask = ratios_batch([1.5, 0.5, 1.0])
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([1.0]), mask)
    # per token max(-A r, -A clip(r)): 1.5 -> -1.2 (clipped), 0.5 -> -0.5, 1.0 -> -1.0
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0) / 3)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["pg_loss"].item() == pytest.approx(loss.item())
    # tokens were sampled by the old policy: KL(old || new) with r = new / old
    assert metrics["approx_kl_k1"].item() == pytest.approx(-sum(math.log(r) for r in (1.5, 0.5, 1.0)) / 3)
    expected_k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.0)) / 3
    assert metrics["approx_kl_k3"].item() == pytest.approx(expected_k3, rel=1e-5)
    loss.backward()
    # d/dlogp of -A r / 3 = -r / 3 where unclipped; no gradient through the clipped token.
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, -1 / 3])


def test_ppo_clip_negative_advantage_and_separate_clip_high() -> None:
    logprobs, old, mask = ratios_batch([1.5, 0.5])
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)  # 0.5 is clipped up to 0.8
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    logprobs, old, mask = ratios_batch([1.5, 1.25])
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 1.25) / 2)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("old_logprob", [float("-inf"), -9999.0, -120.0])
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_an_impossible_recorded_logprob_cannot_poison_the_step(old_logprob: float, advantage: float) -> None:
    """vLLM's OpenAI server records -inf as -9999; any gap over ~89 nats overflows exp() in float32.

    One such token among ordinary ones: the loss and every gradient stay finite, and the ordinary
    tokens' gradients are exactly what they are without it (the bad token's ratio saturates).
    """
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, old_logprob]])  # ratios e^0.1 and e^-0.1: inside the clip range
    mask = torch.ones(1, 3)
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([advantage]), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    ordinary = [math.exp(0.1), math.exp(-0.1)]
    if advantage > 0:  # the bad token is clipped at 1 + 0.2: loss -1.2, no gradient
        expected_loss = (-ordinary[0] - ordinary[1] - 1.2) / 3
    else:  # unclipped -A r with r = e^20 (the clamp), whose gradient is zero past the clamp
        expected_loss = (ordinary[0] + ordinary[1] + math.exp(20.0)) / 3
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    grads = [-advantage * r / 3 for r in ordinary] + [0.0]
    assert logprobs.grad.tolist()[0] == pytest.approx(grads, rel=1e-5)


def test_dual_clip_bounds_the_loss_of_negative_advantages() -> None:
    logprobs, old, mask = ratios_batch([5.0, 2.0, 0.5])
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([-1.0]), mask, dual_clip=3.0)
    # -A r = 5 -> bounded at -A c = 3 (no gradient); 2 stays 2; 0.5 is clipped up to 0.8
    assert loss.item() == pytest.approx((3.0 + 2.0 + 0.8) / 3)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 3, 0.0])
    # positive advantages are untouched by the dual clip
    logprobs, old, mask = ratios_batch([5.0, 0.5])
    plain, _ = losses.ppo_clip(logprobs, old, torch.tensor([1.0]), mask)
    dual, metrics = losses.ppo_clip(logprobs, old, torch.tensor([1.0]), mask, dual_clip=3.0)
    assert dual.item() == pytest.approx(plain.item()) and metrics["dual_clip_fraction"].item() == 0.0
    with pytest.raises(InvalidInput, match="dual_clip"):
        losses.ppo_clip(logprobs, old, torch.tensor([1.0]), mask, dual_clip=1.0)


def test_ppo_clip_per_token_advantages_and_sequence_aggregation() -> None:
    logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    loss, _ = losses.ppo_clip(logprobs, logprobs, advantages, mask, aggregation="sequence")
    assert loss.item() == pytest.approx(-(2.0 + 4.0) / 2)
    loss, _ = losses.ppo_clip(logprobs, logprobs, advantages, mask, aggregation="token")
    assert loss.item() == pytest.approx(-10.0 / 4)


def test_ppo_clip_rollout_aggregation_and_precomputed_weights() -> None:
    logprobs = torch.zeros(3, 2)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    advantages = torch.tensor([1.0, 1.0, 4.0])
    rollouts = torch.tensor([0, 0, 1])
    loss, _ = losses.ppo_clip(
        logprobs, logprobs, advantages, mask, aggregation="rollout", rollout_index=rollouts
    )
    assert loss.item() == pytest.approx(-(1.0 + 4.0) / 2)  # each episode weighs 1/2
    weights = losses.token_weights(mask, "token")
    loss, _ = losses.ppo_clip(logprobs, logprobs, advantages, mask, aggregation="rollout", weights=weights)
    assert loss.item() == pytest.approx(-(1 + 1 + 1 + 4 + 4) / 5)  # weights= wins


def test_ppo_clip_ignores_padding_even_when_it_is_infinite() -> None:
    logprobs = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, float("nan")]])
    mask = torch.tensor([[1, 0]])
    loss, metrics = losses.ppo_clip(logprobs, old, torch.tensor([2.0]), mask, ref_logprobs=old, kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert logprobs.grad.tolist() == [[-2.0, 0.0]]


def test_kl_estimators_hand_computed() -> None:
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert losses.kl(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    assert losses.kl(logprobs, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert losses.kl(logprobs, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(InvalidInput, match="k4"):
        losses.kl(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_estimates_of_the_kl() -> None:
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.25, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    for estimator in ("k1", "k3"):
        expected = float((p * losses.kl(p.log(), q.log(), estimator)).sum())  # exact expectation under p
        assert expected == pytest.approx(true_kl)
    assert (losses.kl(p.log(), q.log(), "k3") >= 0).all()


def test_a_token_far_below_the_reference_cannot_poison_the_step_through_the_kl() -> None:
    """k3 = e^(ref - logp) - 1 - (ref - logp) grows exponentially where the policy has made a token
    far less likely than the reference did; one such token sampled anyway made the KL term of a
    credit-benchmark step 1e4-1e5 times the policy-gradient term, so clipping the gradient's norm
    left the step nothing else. As verl and OpenRLHF do, the log-ratio is clamped to +-20 and k3 to
    at most 10: that token's KL stops there (no gradient past it), the others' is untouched."""
    logprobs = torch.tensor([[math.log(0.5), -30.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    per_token = losses.kl(logprobs, ref, "k3")
    assert per_token[0, 0].item() == pytest.approx(0.5 - 1 + math.log(2))
    assert per_token[0, 1].item() == 10.0
    loss, metrics = losses.ppo_clip(
        logprobs, logprobs.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.5
    )
    loss.backward()
    assert metrics["kl"].item() == pytest.approx((0.5 - 1 + math.log(2) + 10.0) / 2)
    # d k3 / d logp = 1 - e^(ref - logp): 1 - 0.5 for the ordinary token, 0 past the clamp
    assert logprobs.grad.tolist()[0] == pytest.approx([0.5 * 0.5 / 2, 0.0])
    # the log-ratio is clamped before exp(): no overflow even 1,000 nats below the reference
    assert losses.kl(torch.tensor([-1000.0]), torch.tensor([0.0]), "k3").item() == 10.0 == losses.KL_LIMIT


def test_ppo_clip_adds_kl_to_reference() -> None:
    logprobs = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    loss, metrics = losses.ppo_clip(
        logprobs, logprobs, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.5
    )
    assert metrics["kl"].item() == pytest.approx(0.5 - 1 + math.log(2))
    assert loss.item() == pytest.approx(0.5 * metrics["kl"].item())


def test_ppo_clip_rejects_bad_shapes_and_clip_ranges() -> None:
    with pytest.raises(InvalidInput, match="shape"):
        losses.ppo_clip(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(InvalidInput, match="clip"):
        losses.ppo_clip(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), clip_low=-0.1)


def test_sft_nll_hand_computed() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -float("inf")], [-4.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert losses.sft_nll(logprobs, mask).item() == pytest.approx(7 / 3)
    loss = losses.sft_nll(logprobs, mask, aggregation="sequence")
    assert loss.item() == pytest.approx((1.5 + 4) / 2)
    loss.backward()
    assert logprobs.grad.tolist() == [[-0.25, -0.25, 0.0], [-0.5, 0.0, 0.0]]
    rollout = losses.sft_nll(logprobs, mask, aggregation="rollout", rollout_index=torch.tensor([3, 3]))
    assert rollout.item() == pytest.approx((1.5 + 4) / 2)
