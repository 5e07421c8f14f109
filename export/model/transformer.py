"""SAM's two-way transformer (tokens <-> image cross-attention), state_dict-compatible."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Attention-logit bias of a masked key: exp(-1e4) is exactly 0 in float32 and bfloat16, and -1e4 stays
# finite (no inf - inf) in every backend, so a masked token changes no other token's output.
MASKED = -1.0e4


class Attention(nn.Module):
    """Multi-head attention with an optional internal down-projection of the embedding.

    q: (B, Nq, C), k and v: (B, Nk, C) float32 -> (B, Nq, C). ``key_bias`` (B, Nk) float32, added to
    the attention logits of every query and head (0 or :data:`MASKED`: padded point tokens take no part).
    """

    def __init__(self, embedding_dim: int, num_heads: int, *, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.q_proj(q))
        k = self._split(self.k_proj(k))
        v = self._split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if key_bias is not None:
            attn = attn + key_bias[:, None, None, :].to(attn.dtype)
        out = attn.softmax(dim=-1) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class FeedForward(nn.Module):
    """lin1 -> ReLU -> lin2 (keys ``lin1``, ``lin2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token (SAM's block)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool,
                 downsample_rate: int = 2) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor, token_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """token_bias (B, N) float32: attention bias of each token as a key (see :class:`Attention`)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_bias)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_bias)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_bias))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """(B, C, H, W) image, (B, C, H, W) positional encoding, (B, N, C) tokens and optionally their (B, N)
    key bias (0 or :data:`MASKED`) -> ((B, N, C) tokens, (B, H*W, C) image) float32."""

    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                token_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe, token_bias)
        q = queries + tokens
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
