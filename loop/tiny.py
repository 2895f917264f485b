"""Tiny causal language models built offline, for tests, benchmarks and `lightspan demo`.

Nothing may be downloaded at run time, so the tokenizer is a byte-level BPE trained in process
on a small built-in corpus (any text still encodes, byte by byte at worst) with a ChatML chat
template, and the model is a small Llama built from a config. Both are saved with
`save_pretrained`, so every consumer goes through the real `from_pretrained` path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_BUILTIN_CORPUS = """
You are a helpful assistant. Answer the question. Use a tool when you need one.
system user assistant tool call result answer question task search lookup calculator weather
What is the capital of France? The capital of France is Paris. Berlin Madrid Rome Tokyo London
SELECT name FROM users WHERE id = 1; count sum average table column row query error retry
plan step execute observe think final reward success failure yes no true false none
0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) [ ] { } , . : ; ? ! ' " _ # @
"""


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_BUILTIN_CORPUS, *corpus], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Build a tiny Llama and its tokenizer, save both (plus generation config) at `path`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(corpus, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=64,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
