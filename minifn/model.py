"""The decoder as a pure function of a parameter tree.

`init_params(config, seed)` returns a flat dict {name: tensor} (an optree pytree whose names are also
safetensors keys); `apply(params, tokens, config)` binds it into a parameter-free module skeleton,
built once per config on the meta device, with `torch.func.functional_call`. No module owns weights:
any tree with the same names and shapes can be passed in, which is what swapping and vmap rely on.

Architecture: token embedding -> N x [RMSNorm -> causal attention with rotary positions -> residual,
RMSNorm -> SwiGLU -> residual] -> RMSNorm -> head (optionally tied to the embedding). Training may pass
a dropout rate and an RNG key (see `minifn.rng.dropout`): the embedding and each residual branch are dropped out.
Shapes: B batch, T time, D embed_dim, H heads, K head_dim, F ff_dim, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.func import functional_call

from minifn import onednn
from minifn.config import ModelConfig
from minifn.rng import dropout, fold_in

Params = dict[str, Tensor]
# Per layer (keys, values), each [B, H, T_max, K]; preallocated and threaded through, never hidden.
KVCache = list[tuple[Tensor, Tensor]]


@torch.library.custom_op("minifn::rotary_angles", mutates_args=())
def rotary_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, [..., T, K/2] for positions [..., T] (see apply_rotary).

    An op of its own, opaque to inductor, so that the table is computed once per forward: inlined, as inductor
    inlines any pointwise result that reads no memory, its pow, cos and sin were computed again for every
    element of q and k in every layer, forward and backward (benchmarks/profile_step.py)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


@rotary_angles.register_fake
def _(positions, head_dim, theta):
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


@rotary_angles.register_vmap
def _(info, in_dims, positions, head_dim, theta):  # per position: batched positions give batched tables
    return rotary_angles(positions.movedim(in_dims[0], 0), head_dim, theta), (0, 0)


def apply_rotary(x_BHTK: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + K/2]) by its angle: the 'rotate half' layout of Llama."""
    x1, x2 = x_BHTK.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHTK.dtype)


def causal_attention(q_BHTK: Tensor, k_BHTK: Tensor, v_BHTK: Tensor) -> Tensor:
    """Causal scaled dot-product attention. Under a CPU autocast it runs in float32 and returns float32 (the
    next product casts it as autocast says): torch's CPU flash kernel took 2.2-3.0x as long in bfloat16 as
    in float32 at the tutorial's and seed's shapes and 1.06x at bench's (benchmarks/attention.py), and its
    float32 scores are the more exact. On a GPU, autocast's choice stands."""
    if q_BHTK.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
    # An autocast region in the graph already keeps AOTAutograd's cache from this step; a nested one costs
    # nothing more. Under sdpa_kernel(MATH) (sweeps, second derivatives) this is the math kernel, in float32.
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q_BHTK.float(), k_BHTK.float(), v_BHTK.float(), is_causal=True)


class Linear(nn.Linear):
    """nn.Linear whose product runs in oneDNN where that is faster than aten's MKL (see minifn.onednn)."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.qkv = Linear(c.embed_dim, 3 * c.num_heads * c.head_dim, bias=c.bias)
        self.out = Linear(c.num_heads * c.head_dim, c.embed_dim, bias=c.bias)
        # einops' layers parse their patterns once, here; the functional rearrange parses them again in
        # every trace: 0.07 s more of dynamo per call (8 calls at the seed shape, 16 at bench)
        self.split_heads = Rearrange("b t (three h k) -> three b h t k", three=3, h=c.num_heads)
        self.merge_heads = Rearrange("b h t k -> b t (h k)")

    def forward(self, x_BTD, cos, sin, kv=None, positions=None):
        q, k, v = self.split_heads(self.qkv(x_BTD))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            y = causal_attention(q, k, v)
        else:  # write this chunk into the cache (out of place) and attend to every position written so far
            k = kv[0].index_copy(2, positions, k.to(kv[0].dtype))
            v = kv[1].index_copy(2, positions, v.to(kv[1].dtype))
            kv = (k, v)
            mask_TS = torch.arange(k.shape[2], device=k.device)[None, :] <= positions[:, None]
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask_TS)
        return self.out(self.merge_heads(y)), kv


class SwiGLU(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.up = Linear(c.embed_dim, 2 * c.ff_dim, bias=c.bias)  # gate and value in one matmul
        self.down = Linear(c.ff_dim, c.embed_dim, bias=c.bias)

    def forward(self, x_BTD: Tensor) -> Tensor:
        gate, value = self.up(x_BTD).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.embed_dim, c.eps)
        self.attn = Attention(c)
        self.ff_norm = RMSNorm(c.embed_dim, c.eps)
        self.ff = SwiGLU(c)

    def forward(self, x, cos, sin, kv=None, positions=None, dropout_rate=0.0, key=None):
        h, kv = self.attn(self.attn_norm(x), cos, sin, kv, positions)
        x = x + dropout(h, dropout_rate, None if key is None else fold_in(key, 1))
        ff = self.ff(self.ff_norm(x))
        return x + dropout(ff, dropout_rate, None if key is None else fold_in(key, 2)), kv


class Transformer(nn.Module):
    """The computation only: built on the meta device, its parameters are always supplied by the caller."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.embed_dim, c.eps)
        self.head = None if c.tie_embeddings else Linear(c.embed_dim, c.vocab_size, bias=False)
        self.shapes = {name: p.shape for name, p in self.named_parameters()}  # what a parameter tree must hold
        self.names = frozenset(self.shapes)

    def forward(self, tokens_BT: Tensor, cache: KVCache | None = None, pos: Tensor | None = None,
                dropout_rate: float = 0.0, key: Tensor | None = None):
        c = self.config
        positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        if pos is not None:
            positions = positions + pos
        cos, sin = rotary_angles(positions, c.head_dim, c.rope_theta)
        x = dropout(self.embed(tokens_BT), dropout_rate, key)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if cache is None else cache[i], positions,
                          dropout_rate, None if key is None else fold_in(key, i + 1))
            new_cache.append(kv)
        x = self.norm(x)
        logits = onednn.linear(x, self.embed.weight) if self.head is None else self.head(x)
        return logits if cache is None else (logits, new_cache)


_SKELETONS: dict[str, Transformer] = {}


def skeleton(config: ModelConfig) -> Transformer:
    """The parameter-free module for a config (meta tensors only), built once and shared.

    A plain dict rather than lru_cache: torch.compile reads a dict entry as a constant but would trace
    into an lru_cache'd builder. Keyed by the config's string key, which a saved compiled step can spell
    in another process. Call it once outside compiled code (init_params does)."""
    if config.key not in _SKELETONS:
        with torch.device("meta"):
            _SKELETONS[config.key] = Transformer(config).requires_grad_(False)
    return _SKELETONS[config.key]


def _bound(config: ModelConfig, params: Params, args: tuple, kwargs: dict):
    """functional_call on the config's skeleton, with the key check done once here: functional_call's own
    (strict=True, and tie_weights, which the skeleton has none of) walks the module tree four times: a fifth
    of the functions dynamo inlined in a train step."""
    check_params(params, config)
    return functional_call(skeleton(config), params, args, kwargs, tie_weights=False)


def misfit(params: Params, config: ModelConfig, *, shapes: bool = True, stacked: bool = False) -> str | None:
    """How a parameter tree differs from the config's model, or None if it fits: missing or unexpected names,
    or (with shapes) the first leaf of another shape, after a leading member axis if stacked."""
    model = skeleton(config)
    if params.keys() != model.names:
        return f"missing {sorted(model.names - params.keys())}, unexpected {sorted(params.keys() - model.names)}"
    for name, shape in model.shapes.items() if shapes else ():
        got = params[name].shape[1:] if stacked else params[name].shape
        if got != shape:
            return f"{name} has shape {list(got)} where the config's model has {list(shape)}"
    return None


def check_params(params: Params, config: ModelConfig, *, shapes: bool = False, stacked: bool = False) -> None:
    """Raise ValueError unless params has the config's names (and, with shapes, its shapes; see misfit). apply
    checks the names; the steps check shapes too, since apply takes its sizes from the tensors: a tree of
    another width or vocabulary would run silently, and ids would pass a smaller embedding's end."""
    why = misfit(params, config, shapes=shapes, stacked=stacked)
    if why:
        raise ValueError(f"the parameter tree does not fit the config: {why}")


def apply(params: Params, tokens_BT: Tensor, config: ModelConfig, *, dropout_rate: float = 0.0,
          key: Tensor | None = None) -> Tensor:
    """Logits [B, T, V] for token ids [B, T]; pure in params, tokens and key (dropout only with a key)."""
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] > config.max_seq_len:
        raise ValueError(f"apply takes token ids [B, T] with T at most max_seq_len {config.max_seq_len}, "
                         f"got shape {tuple(tokens_BT.shape)}")
    return _bound(config, params, (tokens_BT,), {"dropout_rate": dropout_rate, "key": key})


def apply_cached(params: Params, tokens_BT: Tensor, config: ModelConfig, cache: KVCache, pos: Tensor):
    """Logits for tokens at positions pos.. and the cache with their keys and values written in."""
    return _bound(config, params, (tokens_BT,), {"cache": cache, "pos": pos})


def init_std(name: str, config: ModelConfig) -> float | None:
    """GPT-2 practice: N(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 * layers);
    None means ones for norm gains and zeros for biases."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return None
    if name.endswith("attn.out.weight") or name.endswith("ff.down.weight"):
        return 0.02 / math.sqrt(2 * config.num_layers)
    return 0.02


def init_params(config: ModelConfig, seed: int = 0, device=None, dtype=torch.float32) -> Params:
    """A fresh parameter tree; the same seed gives the same tree on every device."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, meta in skeleton(config).named_parameters():
        std = init_std(name, config)
        if std is None:
            value = torch.ones(meta.shape) if name.endswith("weight") else torch.zeros(meta.shape)
        else:
            value = torch.randn(meta.shape, generator=generator) * std
        params[name] = value.to(device=device, dtype=dtype)
    return params


def num_params(config: ModelConfig) -> int:
    """Closed form of the parameter count (checked against the tree in the tests)."""
    d, hk, f, v = config.embed_dim, config.num_heads * config.head_dim, config.ff_dim, config.vocab_size
    attn = d * 3 * hk + hk * d + (3 * hk + d) * config.bias
    ff = d * 2 * f + f * d + (2 * f + d) * config.bias
    per_layer = attn + ff + 2 * d
    head = 0 if config.tie_embeddings else d * v
    return v * d + config.num_layers * per_layer + d + head


def init_cache(config: ModelConfig, batch_size: int, length: int, device=None, dtype=torch.float32) -> KVCache:
    """Zeroed keys and values for every layer, [B, H, length, K] each."""
    shape = (batch_size, config.num_heads, length, config.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.num_layers)]
