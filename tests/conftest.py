"""Shared fixtures and the independent reference used by the monitor tests.

The reference is deliberately written the obvious way and uses nothing from canonreg: per-sample
forward passes, ``torch.autograd.grad`` of each sample's own loss, explicit patch extraction for
convolutions (a loop over output positions), dense outer products, float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for tiny tensors: with 2 busy cores, OpenMP barriers cost ~30x more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models
class ConvNet1d(nn.Module):
    """Conv1d stack with padding, stride, dilation, 'same' (even kernel: asymmetric) and circular padding."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, kernel_size=3, stride=2, padding=2, dilation=2, bias=bias)
        self.c2 = nn.Conv1d(4, 3, kernel_size=2, padding="same", dilation=3, bias=bias)
        self.c3 = nn.Conv1d(3, 3, kernel_size=3, padding=1, padding_mode="circular", bias=bias)
        self.head = nn.Linear(3, 3, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.relu(self.c2(h))
        h = torch.tanh(self.c3(h))
        return self.head(h.mean(-1))


class ConvNet2d(nn.Module):
    """Conv2d stack: rectangular kernel, stride, dilation, then 'same' with circular padding."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias)
        self.c2 = nn.Conv2d(3, 2, kernel_size=3, padding="same", padding_mode="circular", bias=bias)
        self.head = nn.Linear(2, 3, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.head(h.mean((-2, -1)))


class TinyEncoder(nn.Module):
    """Linear embedding, one nn.TransformerEncoderLayer (batch_first), per-token Linear head."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8, bias=bias)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True, bias=bias
        )
        self.head = nn.Linear(8, 3, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)))


def make_mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.ReLU(inplace=True), nn.Linear(7, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)
    )


@dataclass
class Case:
    """A model, its data and its per-sample loss ``ℓ_i`` (the batch loss is their mean or sum)."""

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    layers: list[str]  # the monitored layers (default selection)

    def loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        # Per sample ℓ_i = cross-entropy of the sample (mean over its tokens for sequences);
        # the batch loss is the mean (or sum) of ℓ_i over samples.
        if out.dim() == 3:
            per_tok = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            per_sample = per_tok.reshape(y.shape).mean(1)
        else:
            per_sample = F.cross_entropy(out, y, reduction="none")
        return per_sample.mean() if reduction == "mean" else per_sample.sum()


def make_case(name: str, bias: bool = True, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    if name == "mlp":
        model = make_mlp(bias)
        shapes, layers = [(12, 5), (9, 5)], ["0", "2", "4"]
    elif name == "conv1d":
        model = ConvNet1d(bias)
        shapes, layers = [(5, 2, 11), (4, 2, 11)], ["c1", "c2", "c3", "head"]
    elif name == "conv2d":
        model = ConvNet2d(bias)
        shapes, layers = [(4, 2, 7, 6), (3, 2, 7, 6)], ["c1", "c2", "head"]
    elif name == "transformer":
        model = TinyEncoder(bias)
        shapes, layers = [(4, 5, 4), (3, 5, 4)], ["embed", "encoder.linear1", "encoder.linear2", "head"]
    else:
        raise ValueError(name)
    model = model.double()
    batches = []
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        y = torch.randint(0, 3, (shape[0], shape[1]) if name == "transformer" else (shape[0],))
        batches.append((x, y))
    return Case(name, model, batches, layers)


CASE_NAMES = ["mlp", "conv1d", "conv2d", "transformer"]


# ----------------------------------------------------------------------------- reference rows
def _conv_rows_in(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches by an explicit loop over output positions (including the layer's padding)."""
    two_d = isinstance(conv, nn.Conv2d)
    if not two_d:
        x = x.unsqueeze(-1)
    ks = tuple(conv.kernel_size) if two_d else (conv.kernel_size[0], 1)
    st = tuple(conv.stride) if two_d else (conv.stride[0], 1)
    dl = tuple(conv.dilation) if two_d else (conv.dilation[0], 1)
    if conv.padding == "same":
        pads = []
        for k, d in zip(ks, dl):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))  # PyTorch puts the odd extra on the right
    elif conv.padding == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        p = tuple(conv.padding) if two_d else (conv.padding[0], 0)
        pads = [(p[0], p[0]), (p[1], p[1])]
    (top, bottom), (left, right) = pads
    if any((top, bottom, left, right)):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        if two_d:
            x = F.pad(x, (left, right, top, bottom), mode=mode)
        else:  # pad only the length axis (F.pad's circular mode wants the true rank)
            x = F.pad(x.squeeze(-1), (top, bottom), mode=mode).unsqueeze(-1)
    out_h = (x.shape[2] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    out_w = (x.shape[3] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = torch.empty(x.shape[1], ks[0], ks[1], dtype=x.dtype)
                for u in range(ks[0]):
                    for v in range(ks[1]):
                        patch[:, u, v] = x[b, :, i * st[0] + u * dl[0], j * st[1] + v * dl[1]]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


def _conv_rows_out(y: Tensor) -> Tensor:
    """``(B, C, *spatial)`` → one row per (sample, position), same order as :func:`_conv_rows_in`."""
    y = y.reshape(y.shape[0], y.shape[1], -1)
    return torch.stack([y[b, :, p] for b in range(y.shape[0]) for p in range(y.shape[2])])


def rows_in(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_rows_in(module, x)
    return x.reshape(-1, x.shape[-1])


def rows_out(module: nn.Module, y: Tensor) -> Tensor:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_rows_out(y)
    return y.reshape(-1, y.shape[-1])


def weight_matrix(module: nn.Module) -> Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


@dataclass
class LayerRef:
    ha: Tensor  # (N, d_a) input rows
    hb: Tensor  # (N, d_b) output rows
    gb: Tensor  # (N, d_b) rows of g_b = −dℓ_i/dh_b (ℓ_i: each sample's own loss)
    w: Tensor  # (d_b, d_a)
    b: Tensor | None

    @property
    def ga(self) -> Tensor:
        return self.gb @ self.w  # g_a = Wᵀ g_b per row


def reference_rows(case: Case, batches: list[tuple[Tensor, Tensor]] | None = None) -> dict[str, LayerRef]:
    """Per-sample loop: forward each sample alone, ``autograd.grad`` of its loss w.r.t. each layer output."""
    model = case.model
    mods = dict(model.named_modules())
    out: dict[str, dict[str, list[Tensor]]] = {n: {"ha": [], "hb": [], "gb": []} for n in case.layers}
    for x, y in batches if batches is not None else case.batches:
        for i in range(x.shape[0]):
            seen: dict[str, tuple[Tensor, Tensor]] = {}

            def keep(m: nn.Module, inp: tuple[Tensor, ...], o: Tensor, n: str) -> Tensor:
                # Keep the layer's own output and hand an identity copy downstream, so that an in-place
                # activation (ReLU(inplace=True)) cannot overwrite h_b or reroute its gradient.
                seen[n] = (inp[0], o)
                return o * 1.0

            handles = [mods[n].register_forward_hook(lambda m, inp, o, n=n: keep(m, inp, o, n)) for n in case.layers]
            try:
                pred = model(x[i : i + 1])
            finally:
                for h in handles:
                    h.remove()
            loss_i = case.loss(pred, y[i : i + 1], reduction="sum")
            grads = torch.autograd.grad(loss_i, [seen[n][1] for n in case.layers])
            for n, g in zip(case.layers, grads):
                inp, o = seen[n]
                out[n]["ha"].append(rows_in(mods[n], inp.detach()))
                out[n]["hb"].append(rows_out(mods[n], o.detach()))
                out[n]["gb"].append(-rows_out(mods[n], g))
    refs = {}
    for n in case.layers:
        b = getattr(mods[n], "bias", None)
        refs[n] = LayerRef(
            ha=torch.cat(out[n]["ha"]).double(),
            hb=torch.cat(out[n]["hb"]).double(),
            gb=torch.cat(out[n]["gb"]).double(),
            w=weight_matrix(mods[n]).double(),
            b=None if b is None else b.detach().double(),
        )
    return refs


def ref_moment(rows: Tensor, mode: str) -> Tensor:
    """Mean of dense outer products after the spec's preprocessing (float64)."""
    x = rows.double()
    if mode == "normalized":
        norms = torch.stack([r.norm() for r in x])
        x = torch.stack([r / nr if nr > 0 else r for r, nr in zip(x, norms)])
    if mode in ("centered", "normalized"):
        x = x - x.mean(0)
    return (x[:, :, None] * x[:, None, :]).mean(0)


def ref_matrices(ref: LayerRef, mode: str) -> dict[str, Tensor]:
    return {
        "H_a": ref_moment(ref.ha, mode),
        "H_b": ref_moment(ref.hb, mode),
        "G_a": ref_moment(ref.ga, mode),
        "G_b": ref_moment(ref.gb, mode),
        "Z_a": ref.w.T @ ref.w,
        "Z_b": ref.w @ ref.w.T,
    }


def ref_pearson(a: Tensor, b: Tensor) -> float:
    x = a.reshape(-1).double() - a.double().mean()
    y = b.reshape(-1).double() - b.double().mean()
    return float((x * y).sum() / math.sqrt(float((x * x).sum() * (y * y).sum())))


def ref_cosine(a: Tensor, b: Tensor) -> float:
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    return float((x * y).sum() / math.sqrt(float((x * x).sum() * (y * y).sum())))


def run_monitor(
    case: Case,
    batches: list[tuple[Tensor, Tensor]] | None = None,
    *,
    reduction: str = "mean",
    step: Callable[[], None] | None = None,
    **kwargs: object,
):
    """Feed ``batches`` through the model under a fresh monitor (weights fixed unless ``step``)."""
    import canonreg

    if case.name == "transformer":  # the module-level layers; the attention's q, k, v, out: tests/test_attention.py
        kwargs.setdefault("layers", case.layers)
    monitor = canonreg.CRHMonitor(case.model, **kwargs)
    with monitor:
        for x, y in batches if batches is not None else case.batches:
            case.model.zero_grad(set_to_none=True)
            case.loss(case.model(x), y, reduction).backward()
            if step is not None:
                step()
    return monitor


def conv1d_and_linear_twins(d_in: int, hidden: int, d_out: int) -> tuple[nn.Module, nn.Module]:
    """The same float64 function twice: transformers' Conv1D (weight stored (d_a, d_b)) and nn.Linear (weightᵀ).

    Needs transformers (callers skip without it).
    """
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(hidden, d_in), nn.Tanh(), Conv1D(d_out, hidden)).double()
    lin = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()
    with torch.no_grad():
        for c in (0, 2):
            lin[c].weight.copy_(conv[c].weight.T)
            lin[c].bias.copy_(conv[c].bias)
    return conv, lin


def two_simulated_ranks(monkeypatch: pytest.MonkeyPatch, rank_main: Callable[[int], object]) -> tuple[dict[int, object], int]:
    """Run ``rank_main(rank)`` for ranks 0 and 1 in two threads whose ``all_reduce_flat`` is a barrier sum.

    Patches ``canonreg.monitor.all_reduce_flat`` and ``_world_size`` (2). Returns each rank's result
    and the number of all-reduce calls rank 0 made; an exception in either rank is re-raised.
    """
    import threading

    import canonreg.monitor as monitor_mod

    barrier = threading.Barrier(2)
    inbox: dict[int, list[Tensor]] = {}
    calls = {"n": 0}

    def fake_all_reduce(tensors: list[Tensor]) -> list[Tensor]:
        rank = int(threading.current_thread().name[-1])
        inbox[rank] = [t.detach().to(torch.float64).clone() for t in tensors]
        barrier.wait()
        out = [a + b for a, b in zip(inbox[0], inbox[1])]
        barrier.wait()
        calls["n"] += rank == 0
        return out

    monkeypatch.setattr(monitor_mod, "all_reduce_flat", fake_all_reduce)
    monkeypatch.setattr(monitor_mod, "_world_size", lambda: 2)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = rank_main(rank)
        except BaseException as e:  # re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, calls["n"]
