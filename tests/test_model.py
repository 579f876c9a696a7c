"""The pure model: causality, equivalence with an nn.Module, swapping trees, counts, validation."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import tiny_config
from minifn.config import ConfigError, ModelConfig
from minifn.model import apply, causal_attention, init_params, num_params, rotary_angles
from minifn.reference import ReferenceTransformer
from minifn.rng import dropout, fold_in


def perturbed(params, scale=0.1):
    """Init has norm gains of one and zero biases; perturb so every parameter matters in a comparison."""
    return {k: v + scale * torch.randn_like(v) for k, v in params.items()}


def test_causal_future_tokens_never_change_the_past(tiny):
    params = perturbed(init_params(tiny, seed=1))
    tokens = torch.randint(0, tiny.vocab_size, (2, tiny.max_seq_len))
    logits = apply(params, tokens, tiny)
    for t in (0, 5, tiny.max_seq_len - 2):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, tiny.vocab_size, changed[:, t + 1:].shape)
        other = apply(params, changed, tiny)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])  # the future does see its own change


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"tie_embeddings": False}, {"head_dim": 20},
                                       {"num_heads": 1, "head_dim": 32, "num_layers": 3}])
def test_matches_reference_module(overrides):
    config = tiny_config(**overrides)
    params = perturbed(init_params(config, seed=int(torch.randint(0, 2**31, ()))))
    tokens = torch.randint(0, config.vocab_size, (3, config.max_seq_len))
    ours = apply(params, tokens, config)
    reference = functional_call(ReferenceTransformer(config), params, (tokens,), strict=True)
    assert ours.shape == (3, config.max_seq_len, config.vocab_size)
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-5
    module = ReferenceTransformer(config)
    module.load_state_dict(params)  # same names: the tree is also a state_dict
    torch.testing.assert_close(module(tokens), reference)


def test_attention_under_a_cpu_autocast_computes_in_float32():
    """Under a CPU bfloat16 autocast, attention on bfloat16 q, k, v is float32 SDPA on them (float32's error
    against float64), where autocast alone would run SDPA in bfloat16; outside autocast it is SDPA itself."""
    seed = int(torch.randint(0, 2**31, ()))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=generator).bfloat16().requires_grad_() for _ in range(3))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)

    def error(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_attention(q, k, v)
        autocasts = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == torch.float32 and autocasts.dtype == torch.bfloat16, seed
    assert error(ours) < 1e-6 and error(autocasts) > 1e-3, (seed, error(ours), error(autocasts))
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(causal_attention(q32, k32, v32), F.scaled_dot_product_attention(q32, k32, v32, is_causal=True))


def test_a_tree_that_does_not_fit_the_config_is_refused_by_name(tiny):
    params = init_params(tiny, seed=0)
    tokens = torch.randint(0, tiny.vocab_size, (1, 4))
    missing = {k: v for k, v in params.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\], unexpected \[\]"):
        apply(missing, tokens, tiny)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        apply({**params, "extra": torch.zeros(1)}, tokens, tiny)


@pytest.mark.slow
def test_swapping_trees_through_compiled_apply_does_not_recompile(tiny):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(apply, fullgraph=True, dynamic=False)
    tokens = torch.randint(0, tiny.vocab_size, (2, tiny.max_seq_len))
    first, second = init_params(tiny, seed=1), init_params(tiny, seed=2)
    a, b, a_again = (compiled(p, tokens, tiny) for p in (first, second, first))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, a_again)
    torch.testing.assert_close(a, apply(first, tokens, tiny), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_forward_computes_the_rotary_table_once(tiny):
    """Inlined, the table's cos and sin were recomputed for every element of q and k in each layer's kernels;
    as an op of its own, no generated kernel computes a cosine."""
    from torch._inductor.utils import run_and_get_code

    params = perturbed(init_params(tiny, seed=3))
    tokens = torch.randint(0, tiny.vocab_size, (2, tiny.max_seq_len))
    logits, codes = run_and_get_code(torch.compile(apply, fullgraph=True, dynamic=False), params, tokens, tiny)
    torch.testing.assert_close(logits, apply(params, tokens, tiny), rtol=1e-4, atol=1e-5)
    code = "\n".join(codes)
    assert "minifn.rotary_angles" in code
    assert "cos" not in code


def test_rotary_table_per_position_and_under_vmap():
    seed = int(torch.randint(0, 2**31, ()))
    positions = torch.randint(0, 4096, (3, 7), generator=torch.Generator().manual_seed(seed))
    cos, sin = rotary_angles(positions[0], 16, 10000.0)
    inv_freq = 10000.0 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = positions[0, :, None].double() * inv_freq
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=2e-3)  # float32 angles up to 4096 rad
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=2e-3)
    batched = torch.vmap(rotary_angles, in_dims=(1, None, None))(positions, 16, 10000.0)
    for i in range(7):
        for got, want in zip(batched, rotary_angles(positions[:, i], 16, 10000.0)):
            assert torch.equal(got[i], want)


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"tie_embeddings": False},
                                       {"num_layers": 5, "ff_dim": 7, "head_dim": 6}, {"vocab_size": 32000}])
def test_parameter_count_matches_closed_form(overrides):
    config = tiny_config(**overrides)
    assert sum(p.numel() for p in init_params(config).values()) == num_params(config)


def test_init_is_deterministic_per_seed(tiny):
    a, b, c = init_params(tiny, 3), init_params(tiny, 3), init_params(tiny, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    assert a["blocks.0.attn.out.weight"].std() < a["blocks.0.attn.qkv.weight"].std()  # residual scaling


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 0, "--num-heads must be positive"),
    ("embed_dim", -4, "--embed-dim must be positive"),
    ("head_dim", 7, "--head-dim must be even for rotary embeddings"),
    ("vocab_size", 2.5, "--vocab-size must be a whole number"),
    ("num_layers", "2", "--num-layers must be a whole number"),
    ("eps", float("nan"), "--eps must be finite"),
    ("ff_dim", float("inf"), "--ff-dim must be"),
    ("max_seq_len", 0, "--max-seq-len must be positive"),
    ("bias", 1, "--bias must be true or false"),
])
def test_config_rejects_each_bad_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{field: value})


def test_config_round_trips_and_names_differences():
    config = tiny_config(bias=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.diff(tiny_config()) == ["bias: True != False"]
    with pytest.raises(ConfigError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_dropout_mask_rate_scale_and_determinism():
    x = torch.ones(200, 500)
    key = torch.tensor(int(torch.randint(0, 2**32, ())))
    y = dropout(x, 0.3, key)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.01  # 100k draws: 5 sigma is 0.007
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))  # inverted: E[y] = x
    assert torch.equal(dropout(x, 0.3, key), y) and not torch.equal(dropout(x, 0.3, fold_in(key, 1)), y)
    assert dropout(x, 0.3, None) is x and dropout(x, 0.0, key) is x
    masks = torch.stack([dropout(x[0], 0.5, fold_in(key, s)) == 0 for s in range(64)])
    assert masks.float().mean(0).std() < 0.1  # every position is dropped about half the time (std 0.0625)


@pytest.mark.slow
def test_dropout_is_bit_identical_compiled():
    x, key = torch.randn(4, 16, 32), torch.tensor(12345)
    compiled = torch.compile(dropout, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x, 0.2, key), dropout(x, 0.2, key))


def test_apply_drops_out_only_with_a_key(tiny):
    params = perturbed(init_params(tiny, seed=1))
    tokens = torch.randint(0, tiny.vocab_size, (2, tiny.max_seq_len))
    plain = apply(params, tokens, tiny)
    torch.testing.assert_close(apply(params, tokens, tiny, dropout_rate=0.5), plain, rtol=0, atol=0)
    a, b = (apply(params, tokens, tiny, dropout_rate=0.5, key=torch.tensor(k)) for k in (1, 2))
    assert not torch.allclose(a, plain) and not torch.allclose(a, b)
    torch.testing.assert_close(apply(params, tokens, tiny, dropout_rate=0.5, key=torch.tensor(1)), a, rtol=0, atol=0)
