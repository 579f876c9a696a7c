"""The same decoder written the usual way: an `nn.Module` that owns its weights.

It is the independent reference for the tests (rotary embedding via complex numbers, RMSNorm by hand)
and the "plain PyTorch" baseline of the benchmarks. Its parameter names match `minifn.model`, so one
tree loads into both: `ReferenceTransformer(config).load_state_dict(params)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minifn.config import ModelConfig


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i + K/2]) by complex multiplication; x [B, H, T, K], freqs [T, K/2]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].float(), x[..., half:].float()) * freqs
    return torch.cat([z.real, z.imag], dim=-1).type_as(x)


class RefAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.h, self.k = c.num_heads, c.head_dim
        self.qkv = nn.Linear(c.embed_dim, 3 * c.num_heads * c.head_dim, bias=c.bias)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.embed_dim, bias=c.bias)

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.h * self.k, dim=-1)
        q, k, v = (t.view(B, T, self.h, self.k).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = rotate(q, freqs), rotate(k, freqs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, self.h * self.k))


class RefSwiGLU(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.f = c.ff_dim
        self.up = nn.Linear(c.embed_dim, 2 * c.ff_dim, bias=c.bias)
        self.down = nn.Linear(c.ff_dim, c.embed_dim, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        return self.down(F.silu(h[..., : self.f]) * h[..., self.f :])


class RefBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RefRMSNorm(c.embed_dim, c.eps)
        self.attn = RefAttention(c)
        self.ff_norm = RefRMSNorm(c.embed_dim, c.eps)
        self.ff = RefSwiGLU(c)

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), freqs)
        return x + self.ff(self.ff_norm(x))


class ReferenceTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.blocks = nn.ModuleList(RefBlock(c) for _ in range(c.num_layers))
        self.norm = RefRMSNorm(c.embed_dim, c.eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.embed_dim, c.vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        c = self.config
        T = tokens.shape[1]
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=tokens.device).float() / c.head_dim)
        freqs = torch.polar(torch.ones(T, c.head_dim // 2, device=tokens.device),
                            torch.outer(torch.arange(T, device=tokens.device).float(), inv_freq))
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, freqs)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)
