"""torch.func and torch.compile (issue 12, items 6 and 7).

Rule under test (canonreg.layers.untraced_call): calls inside torch.func transforms and calls through
functional_call with substituted parameters are never recorded by the monitor, the loss or the noise
wrapper, and never raise; a model already compiled is refused with a message naming torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from canonreg import AlignmentLoss, CRHMonitor
from canonreg.errors import CanonRegError
from canonreg.optim import NoiseCalibrated


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def _func_passes(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """What meta-learning, per-sample-gradient and influence code runs next to training."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    grad(loss_fn)(params, x, y)
    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    assert per_sample["0.weight"].shape == (x.shape[0], 8, 5)
    vmap(model)(x)
    shifted = {k: (v + 0.5).requires_grad_() for k, v in params.items()}  # substituted weights, ordinary tensors
    F.cross_entropy(functional_call(model, shifted, (x,)), y).backward()


def _train(with_func: bool) -> tuple[nn.Module, dict[str, dict[str, float]], dict[str, int], list[float]]:
    model = _mlp()
    monitor = CRHMonitor(model, preprocess="centered").attach()
    align = AlignmentLoss(model, "all", weight=0.5)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05), model, noise=0.5, seed=2)
    values = []
    for x, y in _batches(3):
        opt.zero_grad()
        if with_func:
            _func_passes(model, x, y)
        out = model(x)
        if with_func:
            _func_passes(model, x, y)  # between the forward pass and the loss call: the captures survive
        task = F.cross_entropy(out, y)
        loss = task + align(task)
        values.append(float(loss.detach()))
        loss.backward()
        opt.step()
    report = monitor.compute(exponents=False, ranks=False)
    for owner in (monitor, align, opt):
        owner.detach()
    return model, report.alignment, report.samples, values


def test_torch_func_calls_are_neither_recorded_nor_raise() -> None:
    ref_model, ref_alpha, ref_samples, ref_values = _train(with_func=False)
    model, alpha, samples, values = _train(with_func=True)
    assert samples == ref_samples == {"0": 36, "2": 36}
    assert alpha == ref_alpha
    assert values == ref_values
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # the wrapper's noise came from the ordinary passes only


def test_layers_seen_only_through_torch_func_are_reported_with_the_reason() -> None:
    model = _mlp()
    x, y = _batches(1)[0]
    monitor = CRHMonitor(model).attach()
    align = AlignmentLoss(model, ("f-RWA",))
    _func_passes(model, x, y)
    with pytest.raises(CanonRegError, match="functional_call"):
        monitor.compute()
    with pytest.raises(CanonRegError, match="torch.func"):
        align()
    monitor.detach()
    align.detach()


def test_a_compiled_model_is_refused_with_a_message_naming_torch_compile() -> None:
    model = _mlp()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs
    with pytest.raises(CanonRegError, match="torch.compile.*_orig_mod"):
        CRHMonitor(compiled).attach()
    with pytest.raises(CanonRegError, match="torch.compile"):
        AlignmentLoss(compiled)
    with pytest.raises(CanonRegError, match="torch.compile"):
        NoiseCalibrated(torch.optim.SGD(compiled.parameters(), lr=0.1), compiled)
    inner = _mlp()
    inner[2].compile()  # compiled in place: a submodule
    with pytest.raises(CanonRegError, match=r"torch.compile \(compiled: \['2'\]\)"):
        CRHMonitor(inner).attach()
    # the original module stays usable
    monitor = CRHMonitor(compiled._orig_mod).attach()
    monitor.detach()


def test_attaching_before_compiling_measures_like_eager() -> None:
    x, y = _batches(1)[0]
    alphas = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = _mlp()
        monitor = CRHMonitor(model).attach()
        run = torch.compile(model, backend="eager") if compile_it else model
        F.cross_entropy(run(x), y).backward()
        report = monitor.compute(exponents=False, ranks=False)
        monitor.detach()
        assert report.samples == {"0": 12, "2": 12}
        alphas.append(report.alignment)
    assert alphas[0] == alphas[1]
