"""KV-cached decoding against full recompute, sampling rules, streaming, and a story continued."""

import pytest
import torch

from conftest import shared_file, tiny_config, unique_graphs
from minifn import optim
from minifn.data import batches
from minifn.generate import TextStream, decode_step, generate, make_decode_step, prefill, sample
from minifn.model import apply, init_cache, init_params
from minifn.step import init_state, make_train_step

CONFIG = tiny_config(max_seq_len=24)


def perturbed_params(seed):
    return {k: v + 0.1 * torch.randn_like(v) for k, v in init_params(CONFIG, seed).items()}


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_cached_decoding_matches_full_forward_at_every_position(prompt_len):
    params = perturbed_params(int(torch.randint(0, 1000, ())))
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.max_seq_len))
    full = apply(params, tokens, CONFIG)
    cache = init_cache(CONFIG, 2, CONFIG.max_seq_len)
    logits, cache = prefill(params, tokens[:, :prompt_len], cache, CONFIG)
    steps = [logits]
    for pos in range(prompt_len, CONFIG.max_seq_len):
        step_logits, cache = decode_step(params, tokens[:, pos : pos + 1], cache, torch.tensor(pos), CONFIG)
        steps.append(step_logits[:, None])
    cached = torch.cat(steps, dim=1)
    assert ((cached - full).norm() / full.norm()).item() < 1e-5


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_and_matches_eager():
    params = perturbed_params(3)
    compiled = make_decode_step(CONFIG, compile="on")
    before = unique_graphs()
    ids_compiled = list(generate(params, [5, 6, 7], CONFIG, max_new_tokens=15, decode=compiled, temperature=0))
    ids_eager = list(generate(params, [5, 6, 7], CONFIG, max_new_tokens=15, temperature=0))
    assert ids_compiled == ids_eager and len(ids_eager) == 15
    assert unique_graphs() - before == 1


def test_greedy_is_deterministic_and_sampling_reproducible_per_seed():
    params = perturbed_params(1)

    def run(seed=None, **kw):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return list(generate(params, [1, 2, 3], CONFIG, max_new_tokens=12, generator=gen, **kw))

    assert run(temperature=0) == run(temperature=0)
    assert run(seed=4, temperature=1.5) == run(seed=4, temperature=1.5)
    assert run(seed=4, temperature=1.5) != run(seed=5, temperature=1.5)


def test_generation_stops_at_eos_and_at_the_context_length():
    params = perturbed_params(2)
    first = list(generate(params, [1, 2], CONFIG, max_new_tokens=5, temperature=0))
    stopped = list(generate(params, [1, 2], CONFIG, max_new_tokens=5, temperature=0, eos_id=first[2]))
    assert stopped == first[: first.index(first[2]) + 1]  # up to and including the first EOS
    long = list(generate(params, [1] * 20, CONFIG, max_new_tokens=100, temperature=0))
    assert len(long) == CONFIG.max_seq_len - 20 + 1  # the last token fills the final position
    full = list(generate(params, [1] * 24, CONFIG, max_new_tokens=100, temperature=0))  # fills the context
    assert full == [int(apply(params, torch.ones(1, 24, dtype=torch.long), CONFIG)[0, -1].argmax())]
    with pytest.raises(ValueError, match="shorten the prompt"):
        list(generate(params, [1] * 25, CONFIG, max_new_tokens=1))


def filtered(logits, keep, temperature=1.0):
    """The distribution sampling should draw from: softmax over the kept tokens only."""
    masked = torch.full_like(logits, float("-inf"))
    masked[..., keep] = logits[..., keep] / temperature
    return masked.softmax(-1)


@pytest.mark.parametrize("kwargs,keep", [
    (dict(), [0, 1, 2, 3, 4]),
    (dict(temperature=2.0), [0, 1, 2, 3, 4]),
    (dict(top_k=2), [0, 2]),
    (dict(top_k=1), [0]),
    (dict(top_p=0.8), [0, 2]),  # p0 = 0.64 < 0.8 <= p0 + p2 = 0.88: the nucleus is {0, 2}
    (dict(top_p=0.6), [0]),  # p0 alone already covers 0.6
    (dict(top_p=1e-6), [0]),  # a tiny top_p still keeps the most likely token
    (dict(top_k=3, top_p=0.9, temperature=0.5), [0, 2]),  # after the temperature, p0 = 0.867, p0 + p2 = 0.984
])
def test_sampling_draws_from_the_filtered_distribution(kwargs, keep, recorded_seed):
    logits = torch.tensor([3.0, 1.0, 2.0, -1.0, 0.0])
    n = 20000
    gen = torch.Generator().manual_seed(recorded_seed)
    draws = sample(logits.expand(n, -1), gen, **kwargs)
    frequencies = torch.bincount(draws, minlength=5) / n
    expected = filtered(logits, keep, kwargs.get("temperature", 1.0))
    # one draw's indicator has sd <= 0.5, so the mean of 20000 has sd <= 0.0036: 0.02 is over 5 sd
    assert (frequencies[expected == 0] == 0).all(), frequencies
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.02)
    assert int(sample(logits[None], top_k=10, temperature=0)) == 0  # k beyond the vocabulary is no filter


def test_generate_feeds_every_token_at_its_own_position(recorded_seed):
    """generate()'s loop against one full forward over what it produced: each decode call's logits are the
    full recompute's at that position (a wrong position in the loop changes the rotary angles and the mask)."""
    params = perturbed_params(recorded_seed % 1000)
    seen = []

    def recording_decode(p, token, cache, pos):
        logits, cache = decode_step(p, token, cache, pos, CONFIG)
        seen.append(logits)
        return logits, cache

    prompt = [5, 6, 7]
    gen = torch.Generator().manual_seed(recorded_seed)
    ids = list(generate(params, prompt, CONFIG, max_new_tokens=100, decode=recording_decode, generator=gen))
    assert len(ids) == CONFIG.max_seq_len - len(prompt) + 1 and len(seen) == len(ids) - 1
    full = apply(params, torch.tensor([prompt + ids[:-1]]), CONFIG)[0, len(prompt):]
    cached = torch.cat(seen)
    assert ((cached - full).norm() / full.norm()).item() < 1e-5


def test_repetition_penalty_follows_the_common_definition():
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5]])
    past = torch.tensor([[0, 1]])
    assert int(sample(logits, temperature=0, repetition_penalty=1.2, past_tokens=past)) == 2  # 2/1.2 < 1.9
    penalised = logits.clone()
    penalised[0, 0], penalised[0, 1] = 2.0 / 1.5, -1.0 * 1.5
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws_a = [int(sample(logits, gen_a, repetition_penalty=1.5, past_tokens=past)) for _ in range(50)]
    draws_b = [int(sample(penalised, gen_b)) for _ in range(50)]
    assert draws_a == draws_b


def test_stream_adds_up_to_the_decoded_text():
    from minifn.tokenizer import load_tokenizer

    tok = load_tokenizer()
    prompt = tok.encode("The owl said")
    ids = tok.encode("The owl said: \"Knowledge grows — ünïcödé 🦉 and    spaces.\"\n  Next line")[len(prompt):]
    ids = ids + [tok.sp.piece_to_id("<0xF0>"), tok.sp.piece_to_id("<0x9F>")]  # an incomplete emoji at the end
    stream = TextStream(tok.decode, prompt)
    text = "".join(stream.push(i) for i in ids)
    full = tok.decode(prompt + ids)
    assert not text.endswith("\ufffd")  # the half emoji is held back
    assert full.startswith(tok.decode(prompt) + text)
    assert text == tok.decode(prompt + ids[:-2])[len(tok.decode(prompt)):]


@pytest.fixture(scope="module")
def owl_model():
    """A small model trained on mini-owl.md until it knows the story (60 epochs: its loss is below 0.03 from
    about epoch 55 whatever the shuffle; about 30 s on 2 cores)."""
    from minifn.tokenizer import load_tokenizer

    text = shared_file("mini-owl.md").read_text()
    tok = load_tokenizer()
    config = tiny_config(vocab_size=tok.vocab_size, embed_dim=64, num_layers=2, num_heads=4, head_dim=16,
                         ff_dim=128, max_seq_len=64)
    tx = optim.adamw(lr=1e-2, weight_decay=0.0)
    state = init_state(init_params(config, 0), tx)
    step = make_train_step(config, tx, compile="off")
    tokens = torch.tensor(tok.encode(text))
    for epoch in range(60):
        for batch in batches(tokens, 64, 8, 8, epoch=epoch, shuffle=True):
            state, metrics = step(state, batch)
    return state.params, config, tok, text


def test_greedy_continues_the_story_it_was_trained_on(owl_model):
    params, config, tok, text = owl_model
    first_sentence, rest = text.split("tree.", 1)
    prompt = tok.encode(first_sentence + "tree.")
    ids = list(generate(params, prompt, config, max_new_tokens=12, temperature=0))
    continuation = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert continuation.split()[:6] == rest.split()[:6]  # "One day, a curious young bird"


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be at least 0"),  # drew the least likely tokens most often
    (dict(temperature=float("nan")), "temperature must be at least 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be positive"),  # flipped the seen logits' signs
    (dict(repetition_penalty=0.0), "repetition_penalty must be positive"),  # was a multinomial error
])
def test_sampling_settings_that_would_draw_nonsense_are_refused(kwargs, message):
    logits = torch.randn(1, CONFIG.vocab_size)
    with pytest.raises(ValueError, match=message):
        sample(logits, past_tokens=torch.tensor([[0, 1]]), **kwargs)
    with pytest.raises(ValueError, match=message):
        next(generate(init_params(CONFIG, 0), [1, 2], CONFIG, max_new_tokens=3, **kwargs))


@pytest.mark.parametrize("shape,batch,length", [((1, 20), 1, 16), ((2, 5), 1, 16), ((5,), 1, 16)],
                         ids=["longer than the cache", "another batch size", "not [B, T]"])
def test_a_prompt_that_does_not_fit_the_cache_is_refused(shape, batch, length):
    from minifn.generate import GenerationError

    params = init_params(CONFIG, 0)
    with pytest.raises(GenerationError, match=rf"prompt of shape \[.*\] does not fit a cache of batch {batch} "
                                              rf"and length {length}"):
        prefill(params, torch.randint(0, CONFIG.vocab_size, shape), init_cache(CONFIG, batch, length), CONFIG)
    logits, _ = prefill(params, torch.randint(0, CONFIG.vocab_size, (batch, length)),
                        init_cache(CONFIG, batch, length), CONFIG)  # exactly full fits
    assert logits.shape == (batch, length, CONFIG.vocab_size)
