"""Grouped and depthwise convolutions: excluded with a reason under ``layers=None``, a clear error when asked for.

A grouped convolution maps each group of ``C_in/groups`` input channels to its own ``C_out/groups``
outputs, so it has no single ``(C_out, C_in·k…)`` matrix ``W`` with ``h_b = W h_a + b`` over the
layer's rows except a block-diagonal one; canonreg does not measure it (see ``ConvTap.check``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import canonreg
from canonreg.errors import CanonRegError

pytestmark = pytest.mark.usefixtures("single_thread")


class MobileBlock(nn.Module):
    """A MobileNet-style block in 1-D and 2-D: pointwise, depthwise and grouped convolutions, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(2, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise
        self.gc = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # grouped
        self.pw2 = nn.Conv2d(4, 3, 1)
        self.dw1d = nn.Conv1d(3, 6, 3, padding=1, groups=3)  # depthwise with channel multiplier 2
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.pw2(torch.tanh(self.gc(torch.tanh(self.dw(torch.tanh(self.pw1(x))))))))
        h = torch.tanh(self.dw1d(h.flatten(2)))
        return self.head(h.mean(-1))


GROUPED = {"dw": 4, "gc": 2, "dw1d": 3}


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_layers_none_never_raises_and_lists_every_grouped_conv_with_its_reason() -> None:
    torch.manual_seed(0)
    model = MobileBlock()
    x, y = _data()
    monitor = canonreg.CRHMonitor(model)
    loss = canonreg.AlignmentLoss(model, relations=("f-RWA", "b-RWA"))
    opt = canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05), model, weight_decay=1e-3)
    for owner in (monitor, loss, opt):
        assert set(owner.excluded) == set(GROUPED), type(owner).__name__
        for name, groups in GROUPED.items():
            assert f"'{name}' is a grouped convolution (groups={groups})" in owner.excluded[name]
    assert list(monitor.layers) == ["pw1", "pw2", "head"]
    with monitor:
        for _ in range(2):
            opt.zero_grad()
            task = F.cross_entropy(model(x), y)
            (task + loss(task)).backward()
            opt.step()
    report = monitor.compute(exponents=False, ranks=False)
    assert report.layers == ["pw1", "pw2", "head"]
    assert set(report.excluded) >= set(GROUPED)
    assert report.samples["pw1"] == 2 * 6 * 25 and report.samples["head"] == 2 * 6
    loss.detach()
    opt.detach()
    # measure_crh too
    final = canonreg.measure_crh(model, x, y)
    assert final.layers == ["pw1", "pw2", "head"] and set(final.excluded) >= set(GROUPED)


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_asking_for_a_grouped_conv_raises_naming_it_and_its_groups(name: str) -> None:
    model = MobileBlock()
    pattern = rf"'{name}' is a grouped convolution \(groups={GROUPED[name]}\).*groups=1"
    with pytest.raises(CanonRegError, match=pattern):
        canonreg.CRHMonitor(model, layers=["pw1", name])
    with pytest.raises(CanonRegError, match=pattern):
        canonreg.AlignmentLoss(model, layers=name)
    with pytest.raises(CanonRegError, match=pattern):
        canonreg.CRHMonitor(model, layers=lambda n, m: n == name)  # a predicate asks for it explicitly too
    # a type filter is a filtering form: the grouped ones are excluded, the rest measured
    monitor = canonreg.CRHMonitor(model, layers=(nn.Conv1d, nn.Conv2d))
    assert list(monitor.layers) == ["pw1", "pw2"] and set(monitor.excluded) == set(GROUPED)


def test_only_grouped_convs_gives_an_error_that_lists_their_reasons() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"matched none.*excluded '0': .*groups=4.*excluded '1': .*groups=2"):
        canonreg.CRHMonitor(model)
