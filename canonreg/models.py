"""Small reference models for demos, recipes and tests (every weight layer is tappable)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mlp", "ResidualMLP", "CNN1d", "TinyTransformer"]


def mlp(d_in: int, width: int, depth: int, d_out: int, *, activation: type[nn.Module] = nn.ReLU, bias: bool = True) -> nn.Sequential:
    """``depth`` Linear layers: ``d_in → width → … → width → d_out`` with ``activation`` between.

    Layer names are ``"0", "2", …`` (``nn.Sequential`` indices).
    """
    if depth < 1:
        raise ValueError(f"Expected `depth` to be >= 1, but got {depth!r}")
    dims = [d_in] + [width] * (depth - 1) + [d_out]
    mods: list[nn.Module] = []
    for i in range(depth):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < depth - 1:
            mods.append(activation())
    return nn.Sequential(*mods)


class ResidualMLP(nn.Module):
    """``x → Linear → [h + Linear(act(h))]×blocks → Linear``: a residual MLP."""

    def __init__(self, d_in: int, width: int, blocks: int, d_out: int, *, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.act = activation()
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(self.act(h))
        return self.out(self.act(h))


class CNN1d(nn.Module):
    """A 1-D CNN for sequence classification: conv stack, global average pool, linear head."""

    def __init__(self, length: int, channels: int = 32, layers: int = 3, d_out: int = 10, kernel: int = 5) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        c_in = 1
        for _ in range(layers):
            convs += [nn.Conv1d(c_in, channels, kernel, padding=kernel // 2), nn.ReLU()]
            c_in = channels
        self.features = nn.Sequential(*convs)
        self.head = nn.Linear(channels, d_out)
        self.length = length

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).mean(-1))


class TinyTransformer(nn.Module):
    """A small pre-norm transformer over token sequences; predicts from the last position.

    Attention is written with plain ``nn.Linear`` projections (q, k, v, o), each its own layer and
    parameter (``nn.MultiheadAttention`` is measured too, as ``attn[q|k|v|out]``, its q, k, v as rows of
    the one ``in_proj_weight``).
    """

    def __init__(self, vocab: int, d_model: int = 64, heads: int = 4, layers: int = 2, d_out: int | None = None, seq_len: int = 3) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"Expected `d_model` divisible by `heads`, but got {d_model} and {heads}")
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d_model),
                    "q": nn.Linear(d_model, d_model),
                    "k": nn.Linear(d_model, d_model),
                    "v": nn.Linear(d_model, d_model),
                    "o": nn.Linear(d_model, d_model),
                    "ln2": nn.LayerNorm(d_model),
                    "fc1": nn.Linear(d_model, 4 * d_model),
                    "fc2": nn.Linear(4 * d_model, d_model),
                }
            )
            self.blocks.append(blk)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out if d_out is not None else vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        b, t = tokens.shape
        h = self.embed(tokens) + self.pos[:t]
        for blk in self.blocks:
            assert isinstance(blk, nn.ModuleDict)
            z = blk["ln1"](h)
            q, k, v = (blk[n](z).view(b, t, self.heads, -1).transpose(1, 2) for n in ("q", "k", "v"))
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["o"](att.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["fc2"](torch.nn.functional.gelu(blk["fc1"](blk["ln2"](h))))
        return self.head(self.ln_f(h)[:, -1])
