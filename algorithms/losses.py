"""Policy-gradient and supervised losses on per-token log-probabilities (torch).

Every loss works on tensors shaped [batch, tokens] of log-probabilities of the sampled tokens,
with `mask` = 1 on response tokens (prompt and padding tokens never carry gradient). How tokens
are weighed against each other is explicit, because turn-count bias is real:

* `token`: every response token of the batch weighs the same, so long answers dominate;
* `sequence`: every LLM call weighs the same, its tokens averaged;
* `rollout`: every episode weighs the same, whatever its number of calls and tokens (pass
  `rollout_index`, one integer per sequence).

`token_weights` returns those weights (they sum to 1). With gradient accumulation the weights
of one micro-batch depend on the whole batch: compute them once over the batch and pass slices
as `weights=`.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightspan.errors import InvalidInput

Aggregation = Literal["token", "sequence", "rollout"]
KLEstimator = Literal["k1", "k2", "k3"]

# The log-ratio between current and recorded logprobs is clamped to this many nats, as verl and
# OpenRLHF do: an engine's -inf (vLLM's OpenAI server writes -9999) or any gap over about 89 nats
# overflows exp() in float32, and one such token would turn the whole step's loss or gradient into
# inf or NaN. e^20 is still far outside any clip range, so ordinary tokens are untouched.
LOG_RATIO_LIMIT = 20.0
# The k3 KL estimate of one token is capped at this many nats, as verl and OpenRLHF cap it: it grows
# as e^(ref - logp) where the policy made a sampled token far less likely than the reference did,
# and one such token (e^15 = 3e6) would make the KL term of the whole step, and so the clipped
# gradient, that token's alone. Past the cap the token gets no KL gradient.
KL_LIMIT = 10.0


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token id under `logits` [B, L, V] → [B, L].

    `logits[:, i]` must already be the prediction for `token_ids[:, i]` (shifted by the caller).
    Dividing by the sampling temperature keeps the ratio against the engine's logprobs exact.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    # log_softmax then gather: on CPU a third of the cost of gather minus logsumexp.
    return torch.log_softmax(scaled, dim=-1).gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def token_weights(
    mask: torch.Tensor, aggregation: Aggregation = "token", rollout_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token weights [B, L] that sum to 1 over masked tokens (all zero when nothing is masked)."""
    mask = mask.to(torch.float32)
    per_sequence = mask.sum(dim=-1)
    has_tokens = per_sequence > 0
    if aggregation == "token":
        return mask / mask.sum().clamp(min=1.0)
    if aggregation == "sequence":
        sequences = has_tokens.sum().clamp(min=1)
        return mask / per_sequence.clamp(min=1.0).unsqueeze(-1) / sequences
    if aggregation == "rollout":
        if rollout_index is None or rollout_index.shape != per_sequence.shape:
            raise InvalidInput("aggregation='rollout' needs rollout_index: one integer per sequence")
        _, dense = torch.unique(rollout_index, return_inverse=True)
        calls = torch.zeros(int(dense.max()) + 1 if dense.numel() else 0, device=mask.device)
        calls.index_add_(0, dense, has_tokens.to(torch.float32))
        rollouts = (calls > 0).sum().clamp(min=1)
        sequence_weight = has_tokens / calls[dense].clamp(min=1.0) / rollouts
        return mask / per_sequence.clamp(min=1.0).unsqueeze(-1) * sequence_weight.unsqueeze(-1)
    raise InvalidInput(f"aggregation must be 'token', 'sequence' or 'rollout', got {aggregation!r}")


def kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log p - log q (unbiased, high variance, can be negative); k2 = (log p - log q)^2 / 2;
    k3 = q/p - 1 - log(q/p) (unbiased, always >= 0; Schulman's estimator, GRPO's default), its
    log-ratio clamped to ±`LOG_RATIO_LIMIT` and its value to at most `KL_LIMIT` (verl's low_var_kl).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = torch.clamp(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return torch.clamp(torch.exp(-log_ratio) - 1.0 + log_ratio, max=KL_LIMIT)
    raise InvalidInput(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token",
    rollout_index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clipped surrogate (plus `kl_coef` x KL to a reference when given).

    The ratio exp(logprobs - old_logprobs), its exponent clamped to ±`LOG_RATIO_LIMIT`, is clipped
    to [1 - clip_low, 1 + clip_high]; a larger `clip_high` (DAPO's clip-higher) lets unlikely tokens
    grow. `dual_clip` = c > 1 (verl's `clip_ratio_c`, commonly 3) also bounds the loss of a token
    with a negative advantage at -A·c, so a token the policy now likes far more than the sampler did
    cannot dominate the step. `advantages` is one value per sequence [B] or per token [B, L].

    Returns the loss and detached metrics: `pg_loss`; `clip_fraction` (share of response tokens
    where clipping removed the gradient) and, with `dual_clip`, `dual_clip_fraction`; and the KL
    between the policy that sampled the tokens and the current one, by estimator, over the clamped
    log-ratio: `approx_kl_k1` (mean of old - new logprob: what verl and OpenRLHF log as `ppo_kl`)
    and `approx_kl_k3` (Schulman's unbiased, non-negative (r - 1) - log r); with a reference, `kl`.
    """
    _check_shapes(logprobs, old_logprobs, mask)
    if clip_low < 0 or clip_high < 0:
        raise InvalidInput(f"clip ranges must be non-negative, got low={clip_low}, high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise InvalidInput(f"dual_clip must be greater than 1 (verl's clip_ratio_c, e.g. 3), got {dual_clip}")
    if weights is None:
        weights = token_weights(mask, aggregation, rollout_index)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logprobs.dtype)
    active = mask.bool()
    logprobs, old_logprobs = _masked(logprobs, active), _masked(old_logprobs, active)
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    tokens = active.sum().clamp(min=1)
    metrics = {"clip_fraction": ((clipped > unclipped) & active).sum().detach() / tokens}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = (advantages < 0).expand_as(per_token)
        metrics["dual_clip_fraction"] = ((per_token > bound) & negative & active).sum().detach() / tokens
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    pg_loss = (per_token * weights).sum()
    loss = pg_loss
    with torch.no_grad():
        metrics["pg_loss"] = pg_loss.detach()
        metrics["approx_kl_k1"] = (-log_ratio).sum() / tokens
        metrics["approx_kl_k3"] = (torch.expm1(log_ratio) - log_ratio).sum() / tokens
    if ref_logprobs is not None:
        _check_shapes(logprobs, ref_logprobs, mask)
        kl_loss = (kl(logprobs, _masked(ref_logprobs, active), kl_estimator) * weights).sum()
        loss = loss + kl_coef * kl_loss
        metrics["kl"] = kl_loss.detach()
    return loss, metrics


def sft_nll(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: Aggregation = "token",
    rollout_index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens, weighed by `aggregation`."""
    _check_shapes(logprobs, logprobs, mask)
    if weights is None:
        weights = token_weights(mask, aggregation, rollout_index)
    return -(_masked(logprobs, mask.bool()) * weights).sum()


def _masked(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Zero outside the mask: padding may hold anything (even -inf), and inf * 0 weight is NaN,
    in the loss and in its gradient."""
    return torch.where(active, values, torch.zeros_like(values))


def _check_shapes(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape or a.shape != mask.shape:
        raise InvalidInput(
            f"logprobs and mask must share one [batch, tokens] shape, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(mask.shape)}"
        )
