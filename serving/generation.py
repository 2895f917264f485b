"""Loading a Hugging Face causal LM and decoding a batch of rows with per-row sampling.

Why a hand-written decode loop instead of `model.generate`: `generate` takes one temperature,
one top_p and one global RNG per call, so a batch could only hold requests with identical
parameters and a seeded request's output would depend on its neighbours. Here every row has
its own temperature, top_p, top_k, stop rules, token budget and `torch.Generator`, so any mix
of concurrent requests shares one forward pass per step (the KV cache and attention mask are
the model's own, left padding as in `generate`), and a seeded request draws the same random
numbers whatever else is in the batch. Rows that finish are dropped from the cache, so a long
answer does not make the finished rows pay for its steps.

Logprobs are the model's raw log-softmax (before temperature/top-p/top-k), as vLLM returns by
default: they are the policy's probabilities the trainer needs for off-policy correction.

Streamed rows are detokenized incrementally as they grow, and `on_step` hands each step's new
tokens and text to the caller while the batch is still decoding (the scheduler forwards them to
the waiting HTTP streams); the caller may answer with rows to abort (a client that went away).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightspan.errors import InvalidInput
from lightspan.serving.errors import invalid
from lightspan.serving.sampling import Completion, Row, RowDelta, TokenLogprob

log = logging.getLogger(__name__)


# Called once per decode step with (row index, what the step added) for every streamed row still
# decoding; returns the indices of rows to abort now.
StepListener = Callable[[list[tuple[int, RowDelta]]], Collection[int]]


@dataclass
class ServedModel:
    """A model ready to serve, and the names it answers to.

    `id` is what every response's `model` field says: `name:version` for a store resource,
    the folder name for a plain folder. `name` (the resource or folder name) is accepted in
    requests too, so clients that name it keep working across reloads.
    """

    id: str
    name: str
    path: Path
    model: Any
    tokenizer: Any
    device: Any
    eos_ids: frozenset[int]
    pad_id: int
    max_length: int | None
    version: int | None = None
    created: int = 0
    logits_to_keep: bool = False  # the forward takes `logits_to_keep` (skips the prompt's logits)


def pick_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_served_model(
    path: str | Path,
    *,
    model_id: str,
    name: str,
    version: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> ServedModel:
    """Load a Hugging Face folder (`save_pretrained` layout); InvalidInput if it is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise InvalidInput(f"model folder {path} does not exist")
    started = time.perf_counter()
    target = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype, target)).to(target).eval()
    except (OSError, ValueError, KeyError) as error:
        raise InvalidInput(f"cannot load a causal LM from {path}: {error}") from None
    config_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = {config_eos} if isinstance(config_eos, int) else set(config_eos or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    max_length = getattr(model.config, "max_position_embeddings", None)
    log.info("loaded %s from %s on %s in %.1fs", model_id, path, target, time.perf_counter() - started)
    return ServedModel(
        id=model_id,
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        device=target,
        eos_ids=frozenset(eos),
        pad_id=pad,
        max_length=max_length,
        version=version,
        created=int(time.time()),
        logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
    )


def check_context(loaded: ServedModel, prompt_len: int, max_tokens: int | None) -> int:
    """The token budget of a row; a 400 when the prompt leaves no room, as vLLM answers."""
    if loaded.max_length is None:
        if max_tokens is None:
            raise invalid("max_tokens", "the model's context length is unknown; set max_tokens")
        return max_tokens
    room = loaded.max_length - prompt_len
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room or room < 1:
        raise invalid(
            "max_tokens",
            f"this model's maximum context length is {loaded.max_length} tokens; the prompt has {prompt_len}"
            f" and {max_tokens} were requested for the completion",
            "context_length_exceeded",
        )
    return max_tokens


class _IncrementalText:
    """The text of a growing token list, decoding a window of a few tokens per step (the
    prefix/read offsets of incremental detokenization) rather than the whole answer each time."""

    def __init__(self) -> None:
        self.text = ""
        self._prefix = self._read = 0

    def feed(self, tokens: Sequence[int], tokenizer: Any) -> None:
        before, after = self._window(tokens, tokenizer)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # a special token or half a character: wait for the bytes that finish it
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(tokens)

    def flush(self, tokens: Sequence[int], tokenizer: Any) -> str:
        """The whole text, including tokens `feed` still waits on (the answer ended there)."""
        before, after = self._window(tokens, tokenizer)
        return self.text + after[len(before) :] if len(after) > len(before) else self.text

    def _window(self, tokens: Sequence[int], tokenizer: Any) -> tuple[str, str]:
        before = tokenizer.decode(tokens[self._prefix : self._read], skip_special_tokens=True)
        return before, tokenizer.decode(tokens[self._prefix :], skip_special_tokens=True)


def token_texts(tokenizer: Any, logprobs: Sequence[TokenLogprob]) -> dict[int, str]:
    """Each token id of `logprobs` decoded on its own (vLLM's `token` strings), in one call."""
    ids = sorted({lp.token_id for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top})
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))


class _RowState:
    """Decoding state of one row: its generator, budget, tokens so far and how it ended."""

    def __init__(self, row: Row, budget: int, loaded: ServedModel):
        import torch

        self.row = row
        self.budget = budget
        self.generator = torch.Generator().manual_seed(row.seed)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish: str | None = None
        self.stop_reason: str | int | None = None
        self.cut: str | None = None  # the text, when a stop string ended it
        params = row.params
        self.longest_stop = max((len(s) for s in params.stop), default=0)
        self.detok = _IncrementalText() if params.stop or row.stream else None
        self.sent_tokens = self.sent_chars = 0  # what streamed rows have published so far
        self.end_ids = (frozenset() if params.ignore_eos else loaded.eos_ids) | frozenset(
            params.stop_token_ids
        )

    def add(self, token: int, logprob: float, top: Sequence[tuple[int, float]], tokenizer: Any) -> None:
        params = self.row.params
        self.tokens.append(token)
        if params.logprobs is not None:
            self.logprobs.append(TokenLogprob(token, logprob, tuple(top[: params.logprobs])))
        searched = 0
        if self.detok is not None:
            searched = max(0, len(self.detok.text) - self.longest_stop + 1)
            self.detok.feed(self.tokens, tokenizer)
        if token in self.end_ids:
            self.finish = "stop"
            self.stop_reason = token if token in params.stop_token_ids else None
        elif params.stop and self.detok is not None:
            text = self.detok.text
            hits = [(at, stop) for stop in params.stop if (at := text.find(stop, searched)) >= 0]
            if hits:
                at, stop = min(hits)
                self.finish, self.stop_reason = "stop", stop
                self.cut = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
        if self.finish is None and len(self.tokens) >= self.budget:
            self.finish = "length"

    def text(self, tokenizer: Any) -> str:
        """The answer's text once finished; a streamed row's is the text it streamed."""
        if self.cut is not None:
            return self.cut
        if self.detok is not None and self.row.stream:
            return self.detok.flush(self.tokens, tokenizer)
        return tokenizer.decode(self.tokens, skip_special_tokens=True)

    def delta(self, tokenizer: Any) -> RowDelta:
        """What this step added to a streamed row (see `RowDelta` for the held-back text)."""
        assert self.detok is not None
        if self.finish is not None:
            visible = self.text(tokenizer)
        else:  # the last longest_stop - 1 characters could still begin a stop string
            text = self.detok.text
            visible = text[: max(0, len(text) - max(0, self.longest_stop - 1))]
        piece = visible[self.sent_chars :]
        self.sent_chars = max(self.sent_chars, len(visible))
        new_ids, self.sent_tokens = self.tokens[self.sent_tokens :], len(self.tokens)
        logprobs = (
            self.logprobs[len(self.logprobs) - len(new_ids) :]
            if self.row.params.logprobs is not None
            else None
        )
        return RowDelta(
            token_ids=new_ids,
            text=piece,
            logprobs=logprobs,
            token_text=token_texts(tokenizer, logprobs) if logprobs else {},
            finish_reason=self.finish,
            stop_reason=self.stop_reason,
        )

    def completion(self, tokenizer: Any) -> Completion:
        logprobs = self.logprobs if self.row.params.logprobs is not None else None
        return Completion(
            token_ids=self.tokens,
            text=self.text(tokenizer),
            finish_reason=self.finish or "length",
            stop_reason=self.stop_reason,
            logprobs=logprobs,
            token_text=token_texts(tokenizer, logprobs) if logprobs else {},
        )


def _sample(torch: Any, logits: Any, states: Sequence[_RowState]) -> Any:
    """One token per row: greedy where temperature is 0, else inverse-CDF sampling in vocabulary
    order with the row's own uniform draw, after its temperature, top-k and top-p.

    Filtering zeroes the tokens below a row's cut-off instead of reordering the vocabulary, so a
    row maps its draw to a token the same way whatever its neighbours ask for.
    """
    device = logits.device
    params = [s.row.params for s in states]
    # Every row draws exactly one number per step, so a seeded row's stream never depends on others.
    uniform = torch.stack([torch.rand((), generator=s.generator) for s in states]).to(device)
    temperature = torch.tensor([p.temperature for p in params], device=device)
    probs = (logits / temperature.clamp(min=1e-5)[:, None]).softmax(-1)
    filtered = [i for i, p in enumerate(params) if p.top_p < 1.0 or p.top_k > 0]
    if filtered:
        index = torch.tensor(filtered, device=device)
        subset = probs[index]
        ranked = subset.sort(dim=-1, descending=True).values
        rank = torch.arange(ranked.shape[-1], device=device)[None, :]
        top_p = torch.tensor([params[i].top_p for i in filtered], device=device)[:, None]
        top_k = torch.tensor([params[i].top_k or ranked.shape[-1] for i in filtered], device=device)[:, None]
        drop = ((ranked.cumsum(-1) - ranked) >= top_p) | (rank >= top_k)
        cutoff = ranked.masked_fill(drop, float("inf")).min(-1).values  # the top token is never dropped
        probs[index] = subset.masked_fill(subset < cutoff[:, None], 0.0)
    cdf = probs.cumsum(-1)
    sampled = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp(
        max=probs.shape[-1] - 1
    )
    greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    return torch.where(greedy, logits.argmax(-1), sampled[:, 0])


def generate(
    loaded: ServedModel,
    rows: Sequence[Row],
    budgets: Sequence[int],
    on_step: StepListener | None = None,
) -> list[Completion]:
    """Decode all rows together; returns one Completion per row, in order.

    `on_step` (if given) is called after every step with what it added to each streamed row still
    decoding; rows whose index it returns end at once with finish_reason "abort".
    """
    import torch

    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    states = [_RowState(row, budget, loaded) for row, budget in zip(rows, budgets, strict=True)]
    streamed = any(row.stream for row in rows)
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
        mask[i, width - len(row.prompt_ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want_top = max((r.params.logprobs or 0) for r in rows)
    active = list(range(len(rows)))
    cache = None
    with torch.inference_mode():
        while active:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **({"logits_to_keep": 1} if loaded.logits_to_keep else {}),
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            live = [states[i] for i in active]
            tokens = _sample(torch, logits, live)
            logprobs = logits.log_softmax(-1)
            chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
            if want_top:
                top_values, top_ids = (t.tolist() for t in logprobs.topk(want_top, dim=-1))
            token_list = tokens.tolist()
            for k, state in enumerate(live):
                top = list(zip(top_ids[k], top_values[k], strict=True)) if want_top else []
                state.add(token_list[k], chosen[k], top, tokenizer)
            if streamed and on_step is not None:
                deltas = [(i, states[i].delta(tokenizer)) for i in active if states[i].row.stream]
                for i in on_step(deltas) if deltas else ():
                    states[i].finish = states[i].finish or "abort"
            keep = [k for k, state in enumerate(live) if state.finish is None]
            if len(keep) < len(live):
                active = [active[k] for k in keep]
                if not active:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, mask, positions = tokens[index], mask[index], positions[index]
            input_ids = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
    return [state.completion(tokenizer) for state in states]
