"""CUDA checks: the monitor, the loss and the optimizer wrapper give the same numbers on a GPU.

Every test here needs a CUDA device and is skipped without one (CI has none). They compare against
the independent per-sample reference of ``conftest.py`` (computed on the CPU in float64) or against
the same computation on the CPU, and exercise what only a GPU has: CUDA autocast in bfloat16 and
``torch.amp.GradScaler(CUDA.type)`` with float16 autocast.

    python -m pytest -q tests/test_cuda.py      # on a machine with a GPU
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CASE_NAMES, make_case, ref_matrices, ref_pearson, reference_rows, run_monitor
from torch import Tensor, nn

import canonreg
from canonreg import functional as cf
from canonreg.optim import NoiseCalibrated

#: ``CANONREG_TEST_DEVICE=cpu`` runs these comparisons CPU-against-CPU (a dry run of the test logic).
CUDA = torch.device(os.environ.get("CANONREG_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(batches: list[tuple[Tensor, Tensor]], device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [(x.to(device), y.to(device)) for x, y in batches]


def _mlp(width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 5))


def _data(n: int = 64, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


# ------------------------------------------------------------------ monitor
@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("preprocess", cf.PREPROCESS_MODES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_monitor_on_cuda_matches_the_cpu_reference(name: str, preprocess: str, defer: bool) -> None:
    """float64 model on the GPU: the six matrices and α equal the per-sample CPU reference."""
    case = make_case(name)
    refs = reference_rows(case)  # on the CPU, before the model moves
    case.model.to(CUDA)
    monitor = run_monitor(case, _to(case.batches, CUDA), preprocess=preprocess, defer_checks=defer)
    report = monitor.compute()
    for layer in case.layers:
        want = ref_matrices(refs[layer], preprocess)
        got = report.matrices(layer)
        for key, m in want.items():
            torch.testing.assert_close(got[key].cpu(), m, rtol=1e-8, atol=1e-10, msg=f"{layer} {key}")
        assert report.alignment[layer]["f-RWA"] == pytest.approx(ref_pearson(want["H_a"], want["Z_a"]), abs=1e-8)
    monitor.detach()


def test_monitor_float32_cuda_equals_float32_cpu() -> None:
    """The same float32 training on both devices: α and the balance terms agree to float32 round-off."""
    x, y = _data(256)
    reports = []
    for device in ("cpu", CUDA.type):
        model = _mlp(128).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = canonreg.CRHMonitor(model, preprocess="normalized", track_balance=True)
        with monitor:
            for i in range(4):
                xb, yb = x[64 * i : 64 * (i + 1)].to(device), y[64 * i : 64 * (i + 1)].to(device)
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        reports.append(monitor.compute(lr=0.05, weight_decay=1e-3, batch_size=64))
    cpu, gpu = reports
    for layer in cpu.layers:
        for rel in canonreg.RELATIONS:
            assert gpu.alignment[layer][rel] == pytest.approx(cpu.alignment[layer][rel], abs=2e-4), (layer, rel)
    assert gpu.to_dict()["balance"].keys() == cpu.to_dict()["balance"].keys()


def test_monitor_under_cuda_autocast_bfloat16_is_close_to_float32() -> None:
    x, y = _data(256)
    model = _mlp(64).to(CUDA)
    alphas = []
    for autocast in (False, True):
        monitor = canonreg.CRHMonitor(model, preprocess="centered")
        with monitor, torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast):
            model.zero_grad()
            F.cross_entropy(model(x.to(CUDA)).float(), y.to(CUDA)).backward()
        rep = monitor.compute()
        alphas.append([rep.alignment[n][r] for n in rep.layers for r in canonreg.RELATIONS])
    for a, b in zip(*alphas):
        assert b == pytest.approx(a, abs=0.03)


@pytest.mark.parametrize("defer", [None, True, False])
def test_monitor_on_cuda_drops_non_finite_calls_like_the_cpu(defer: bool | None) -> None:
    """Deferred (device masks, no host sync in the hooks) or immediate checks: the CPU's numbers."""
    case = make_case("mlp")
    (x1, y1), (x2, y2) = case.batches
    bad = x1.clone()
    bad[0, 0] = float("nan")
    reports = []
    for device in ("cpu", CUDA.type):
        case.model.to(device)
        monitor = canonreg.CRHMonitor(case.model, nonfinite="skip", preprocess="normalized", defer_checks=defer)
        with monitor:
            for x, y in ((x1, y1), (bad, y1), (x2, y2)):
                case.model.zero_grad()
                case.loss(case.model(x.to(device)).nan_to_num(), y.to(device)).backward()
        reports.append(monitor.compute(n_bootstrap=0))
    cpu, gpu = reports
    assert gpu.skipped == cpu.skipped and cpu.skipped["0"] == 1 and gpu.samples == cpu.samples
    for layer in case.layers:
        for k, v in cpu.matrices(layer).items():
            torch.testing.assert_close(gpu.matrices(layer)[k], v, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ loss
@pytest.mark.parametrize("g_mode", ["ema", "exact"])
def test_alignment_loss_value_and_gradients_cuda_equal_cpu(g_mode: str) -> None:
    x, y = _data(48)
    results = []
    for device in ("cpu", CUDA.type):
        model = _mlp(24).double().to(device)
        align = canonreg.AlignmentLoss(model, canonreg.RELATIONS, g_mode=g_mode, preprocess="normalized")
        xd, yd = x.double().to(device), y.to(device)
        if g_mode == "ema":  # one backward pass to fill the EMA of G
            F.cross_entropy(model(xd), yd).backward()
            model.zero_grad()
        task = F.cross_entropy(model(xd), yd)
        reg = align(task) if g_mode == "exact" else align()
        grads = torch.autograd.grad(task + reg, list(model.parameters()))
        results.append((reg.detach().cpu(), [g.cpu() for g in grads]))
        align.detach()
    (r_cpu, g_cpu), (r_gpu, g_gpu) = results
    torch.testing.assert_close(r_gpu, r_cpu, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------ optimizer wrapper
def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _batches(k: int, device: torch.device, n: int = 32) -> list[tuple[Tensor, Tensor]]:
    x, y = _data(n * k, seed=7)
    return [(x[n * i : n * (i + 1)].to(device), y[n * i : n * (i + 1)].to(device)) for i in range(k)]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_noise_calibrated_zero_strength_is_bit_exact_on_cuda(base: str) -> None:
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0)}[base]
    ref_model = _mlp().to(CUDA)
    model = copy.deepcopy(ref_model)
    batches = _batches(5, CUDA)
    _train(ref_model, make(list(ref_model.parameters())), batches)
    _train(model, NoiseCalibrated(make(list(model.parameters())), model, weight_decay=0.0, noise=0.0), batches)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_noise_calibrated_cuda_follows_the_cpu_trajectory_and_resumes_exactly() -> None:
    """Noise draws come from a CPU generator: the GPU run follows the CPU run to float64 round-off, and
    a checkpoint taken on the GPU resumes exactly."""
    kw = dict(weight_decay=1e-2, noise="auto", sketch=8, target_share=0.5, seed=5)
    runs = {}
    for device in ("cpu", CUDA.type):
        model = _mlp().double().to(device)
        opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, **kw)  # type: ignore[arg-type]
        _train(model, opt, [(x.double(), y) for x, y in _batches(6, torch.device(device))])
        runs[device] = [p.detach().cpu() for p in model.parameters()]
    for a, b in zip(runs["cpu"], runs[CUDA.type]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)

    batches = _batches(6, CUDA)
    full_model = _mlp().to(CUDA)
    full = NoiseCalibrated(torch.optim.Adam(full_model.parameters(), lr=1e-3), full_model, **kw)  # type: ignore[arg-type]
    _train(full_model, full, batches)
    model = _mlp().to(CUDA)
    opt = NoiseCalibrated(torch.optim.Adam(model.parameters(), lr=1e-3), model, **kw)  # type: ignore[arg-type]
    _train(model, opt, batches[:3])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model2 = _mlp(seed=9).to(CUDA)
    opt2 = NoiseCalibrated(torch.optim.Adam(model2.parameters(), lr=1e-3), model2, **{**kw, "seed": 77})  # type: ignore[arg-type]
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, batches[3:])
    for p, q in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_cuda_float16_autocast_unscaled_and_skips() -> None:
    scaler = torch.amp.GradScaler(CUDA.type, init_scale=2.0**14)
    model = _mlp(64).to(CUDA)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05), model, weight_decay=1e-3, noise=1.0, grad_scaler=scaler, seed=2)
    batches = _batches(4, CUDA)
    for xb, yb in batches:
        opt.zero_grad()
        with torch.autocast(CUDA.type, dtype=torch.float16):
            loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the measured noise uses unscaled gradients: it does not grow with the loss scale (2^14)
    for st in opt.balance_state.values():
        assert 0 < st.unit_noise < 1e3
    before = copy.deepcopy(model.state_dict())
    state = opt.balance_state
    opt.zero_grad()
    with torch.autocast(CUDA.type, dtype=torch.float16):
        loss = F.cross_entropy(model(batches[0][0]), batches[0][1]) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)  # inf gradients: the step is skipped and nothing is injected or measured
    scaler.update()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert opt.balance_state == state
