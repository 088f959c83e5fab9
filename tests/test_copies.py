"""Copies of a model never carry canonreg hooks (issue 12, item 4): deepcopy, pickle, torch.save, EMA/SWA.

Each test trains a reference model with the same seeds and no copies, and checks the copied run
against it bit for bit (the copies must not feed, or be fed by, the monitor, the loss or the wrapper).
"""

from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from canonreg import AlignmentLoss, CRHMonitor
from canonreg.layers import OwnedHook, inert_hook
from canonreg.optim import NoiseCalibrated

_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _hooks(model: nn.Module) -> list[object]:
    return [h for m in model.modules() for t in _TABLES for h in getattr(m, t).values()]


def _canonreg_hooks(model: nn.Module) -> list[object]:
    return [h for h in _hooks(model) if isinstance(h, OwnedHook) or h is inert_hook]


def _run(copies: bool) -> tuple[nn.Module, list[float], dict[str, dict[str, float]], dict[str, Tensor] | None]:
    """Three steps of task + AlignmentLoss under a CRHMonitor and NoiseCalibrated; with ``copies``, an EMA
    model is updated every step and deep copies / pickles / torch.save round trips run forward and backward."""
    model = _mlp()
    align = AlignmentLoss(model, "all", weight=0.5)
    monitor = CRHMonitor(model, preprocess="centered").attach()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05), model, noise=0.5, seed=3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if copies else None
    losses = []
    for x, y in _batches(3):
        opt.zero_grad()
        task = F.cross_entropy(model(x), y)
        loss = task + align(task)
        loss.backward()
        losses.append(float(loss.detach()))
        if copies:
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]
            for clone in clones:
                # a copy holds only inert placeholders, which leave at its first forward call
                assert all(h is inert_hook for h in _canonreg_hooks(clone))
                plain = _mlp()
                plain.load_state_dict(clone.state_dict())
                out = clone(x)
                assert torch.equal(out, plain(x))
                F.cross_entropy(out, y).backward()
                assert _hooks(clone) == []
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
            ema(x)  # the EMA copy runs: nothing is recorded for it
    report = monitor.compute(exponents=False)
    monitor.detach()
    align.detach()
    opt.detach()
    alphas = {n: {r: float(v) for r, v in rel.items()} for n, rel in report.alignment.items()}
    state = None if ema is None else {k: v.clone() for k, v in ema.module.state_dict().items()}
    return model, losses, alphas, state


def test_ema_deepcopy_pickle_and_torch_save_of_an_attached_model() -> None:
    ref_model, ref_losses, ref_alphas, _ = _run(copies=False)
    model, losses, alphas, ema_state = _run(copies=True)
    # the original trains, measures and is shaped exactly as without any copy
    assert losses == ref_losses
    assert alphas == ref_alphas
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    # the EMA copy averaged the trajectory: reference EMA by hand (first update copies, then 0.9/0.1)
    assert ema_state is not None
    model2 = _mlp()
    want = {k: v.clone() for k, v in model2.state_dict().items()}
    align = AlignmentLoss(model2, "all", weight=0.5)
    opt = NoiseCalibrated(torch.optim.SGD(model2.parameters(), lr=0.05), model2, noise=0.5, seed=3)
    with CRHMonitor(model2, preprocess="centered"):
        for i, (x, y) in enumerate(_batches(3)):
            opt.zero_grad()
            task = F.cross_entropy(model2(x), y)
            (task + align(task)).backward()
            opt.step()
            for k, v in model2.state_dict().items():
                want[k] = v.clone() if i == 0 else 0.9 * want[k] + 0.1 * v
    align.detach()
    opt.detach()
    for k, v in want.items():
        torch.testing.assert_close(ema_state[k], v, rtol=0, atol=1e-14)


def test_copy_of_a_loss_held_by_the_model_is_detached_and_reattaches() -> None:
    class Holder(nn.Module):  # e.g. a LightningModule that keeps its loss as an attribute
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.align = AlignmentLoss(self.net, ("f-RWA", "b-RWA"))

    holder = Holder()
    x = _batches(1)[0][0]
    clone = copy.deepcopy(holder)
    assert holder.align.attached and not clone.align.attached
    assert clone.align.model is clone.net and _hooks(clone.net) != []
    holder.net(x)
    want = holder.align()
    clone.net(x)  # inert: drops its placeholders, records nothing
    assert _hooks(clone.net) == []
    clone.align.attach()
    assert all(isinstance(h, OwnedHook) for h in _hooks(clone.net))
    clone.net(x)
    assert torch.equal(clone.align(), want)
    for c in (clone, holder):
        c.align.detach()
        assert _hooks(c.net) == []
