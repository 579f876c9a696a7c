"""Text generation with a KV cache: prefill the prompt once, then one compiled decode step per token.

The cache is a pytree of preallocated tensors (per layer keys and values, [B, H, T_max, K]) passed in
and returned, never hidden in a module; the position is a 0-D tensor, so one compiled decode step
serves every position. Sampling is a pure function of logits and a torch.Generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from minifn.compiling import maybe_compile
from minifn.config import ModelConfig
from minifn.model import KVCache, Params, apply_cached, init_cache, skeleton


class GenerationError(ValueError):
    """A prompt the model cannot continue (empty, or longer than its context)."""


def prefill(params: Params, tokens_BT: Tensor, cache: KVCache, config: ModelConfig) -> tuple[Tensor, KVCache]:
    """Logits [B, T, V] for the prompt, and the cache holding its keys and values at positions 0..T-1.
    A prompt of another batch size than the cache's, or longer than it, is a GenerationError (the cache
    write would fail with an index error)."""
    B, _, T_max, _ = cache[0][0].shape  # layer 0's keys
    if tokens_BT.ndim != 2 or tokens_BT.shape[0] != B or tokens_BT.shape[1] > T_max:
        raise GenerationError(f"a prompt of shape {list(tokens_BT.shape)} does not fit a cache of batch {B} and "
                              f"length {T_max}; give tokens [B, T] with T at most the cache's length")
    return apply_cached(params, tokens_BT, config, cache, torch.zeros((), dtype=torch.long, device=tokens_BT.device))


def decode_step(params: Params, token_B1: Tensor, cache: KVCache, pos: Tensor,
                config: ModelConfig) -> tuple[Tensor, KVCache]:
    """Logits [B, V] for one new token at position pos (0-D), and the cache with it written in."""
    logits, cache = apply_cached(params, token_B1, config, cache, pos)
    return logits[:, -1], cache


def sample(logits_BV: Tensor, generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, repetition_penalty: float = 1.0, past_tokens: Tensor | None = None) -> Tensor:
    """Next token ids [B]. Temperature 0 is argmax; top-k and top-p always keep the most likely token;
    the repetition penalty divides positive and multiplies negative logits of tokens already present.
    A negative temperature (which would favour the least likely tokens) or a penalty <= 0 is a ValueError."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be at least 0 (0: argmax), got {temperature}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive (1: none), got {repetition_penalty}")
    logits = logits_BV.float()
    if repetition_penalty != 1.0 and past_tokens is not None and past_tokens.numel():
        seen = logits.gather(-1, past_tokens)
        logits = logits.scatter(-1, past_tokens, torch.where(seen > 0, seen / repetition_penalty,
                                                             seen * repetition_penalty))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def make_decode_step(config: ModelConfig, compile: str = "auto", device="cpu") -> Callable:
    skeleton(config)
    return maybe_compile(lambda p, t, c, pos: decode_step(p, t, c, pos, config), compile, torch.device(device))


def check_prompt(prompt_ids: list[int], config: ModelConfig) -> None:
    """Raise GenerationError unless the model can continue prompt_ids: at least one token, and no more than
    its context (a prompt that fills it still predicts one token). generate() checks it when first advanced;
    callers that print the prompt first check it before."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(prompt_ids) > config.max_seq_len:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                              f"{config.max_seq_len}; shorten the prompt")


def generate(params: Params, prompt_ids: list[int], config: ModelConfig, *, max_new_tokens: int,
             decode: Callable | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield new token ids one at a time until EOS, max_new_tokens, or the model's context is full."""
    check_prompt(prompt_ids, config)
    device = next(iter(params.values())).device
    decode = decode or (lambda p, t, c, pos: decode_step(p, t, c, pos, config))
    cache = init_cache(config, 1, config.max_seq_len, device=device, dtype=next(iter(params.values())).dtype)
    tokens = torch.tensor([prompt_ids], device=device)
    logits, cache = prefill(params, tokens, cache, config)
    logits = logits[:, -1]
    history = tokens
    for pos in range(len(prompt_ids), min(len(prompt_ids) + max_new_tokens, config.max_seq_len + 1)):
        token = sample(logits, generator, temperature, top_k, top_p, repetition_penalty, history)
        yield int(token)
        if int(token) == eos_id or pos == config.max_seq_len:
            return
        history = torch.cat([history, token[:, None]], dim=1)
        logits, cache = decode(params, token[:, None], cache, torch.tensor(pos, device=device))


class TextStream:
    """Turns a growing list of ids into text pieces that add up exactly to decode(all ids): each call
    returns only the new characters, and holds back an incomplete UTF-8 sequence until it completes."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]):
        self.decode, self.ids = decode, list(prompt_ids)
        self.emitted = len(decode(self.ids))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
