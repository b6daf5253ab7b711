"""A GPT-style character language model cut into stages between its blocks (``model.kind: gpt``).

The layers, in the model registry's sense (:mod:`dni.models`): layer 0 embeds the tokens
(token and position embeddings) and runs block 0; layers 1..depth-1 are one pre-LayerNorm
transformer block each (causal self-attention, then a 4x GELU MLP, each a residual branch);
layer ``depth`` is the final LayerNorm and the linear head over the vocabulary. Between
stages travels the residual stream, (B, T, width) per batch, and a stage's synthesizer
predicts its gradient per position. The blocks and initialisation follow nanoGPT (weights
normal(0, 0.02), residual projections scaled by 1/sqrt(2 * depth), biases, no dropout);
unlike nanoGPT the head is not tied to the token embedding, because the two live in
different stages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, C / heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)): one transformer block (pre-LayerNorm)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class Embedding(nn.Module):
    """Token ids (B, T) to the residual stream (B, T, width): token plus position embeddings."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"a sequence of {t} tokens is longer than the model's context {self.context}")
        return self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))


class Head(nn.Module):
    """The residual stream to next-token logits (B, T, vocab): final LayerNorm and a linear map."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def init_gpt_(module: nn.Module, depth: int) -> None:
    """nanoGPT's initialisation: Linear and Embedding weights normal(0, 0.02), biases zero, and each
    residual branch's output projection at 0.02 / sqrt(2 * depth), so the stream's variance does not
    grow with depth."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj") else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def gpt_layer(index: int, *, vocab: int, context: int, depth: int, width: int, heads: int) -> nn.Module:
    """Layer ``index`` of a ``depth``-block GPT (see the module docstring), initialised."""
    if index == 0:
        layer: nn.Module = nn.Sequential(Embedding(vocab, context, width), Block(width, heads))
    elif index < depth:
        layer = Block(width, heads)
    elif index == depth:
        layer = Head(width, vocab)
    else:
        raise ValueError(f"a {depth}-block GPT has layers 0..{depth}, not {index}")
    init_gpt_(layer, depth)
    return layer
