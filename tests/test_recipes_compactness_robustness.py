"""The compactness and robustness recipes: their helpers against independent references, and each
recipe's ``--quick`` mode end to end (outputs exist, every arm is present, values are finite and in
range)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("mnist1d")
pytest.importorskip("scipy")
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny trials: one thread, as in the recipes and the runner

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import _common  # noqa: E402
import compactness  # noqa: E402
import robustness  # noqa: E402

from canonreg.data import mnist1d, mnist1d_args  # noqa: E402
from canonreg.experiment import ARMS, load_data, run_trial  # noqa: E402


# ---------------------------------------------------------------------- robustness helpers
@pytest.mark.parametrize("overrides", [{}, {"max_translation": 72, "scale_coeff": 1.2, "iid_noise_scale": 0.1, "corr_noise_scale": 0.5, "shear_scale": 2.5}])
def test_render_reproduces_the_mnist1d_generator(monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]) -> None:
    # canonreg.data.mnist1d seeds NumPy's global RNG, runs mnist1d's transform per sample (label
    # blocks), then permutes; the same draws from RandomState(seed) must give the same samples.
    monkeypatch.setenv("CANONREG_CACHE_DIR", "off")
    n, seed = 200, 7
    ref = mnist1d(num_samples=n, seed=seed, **overrides)
    args = mnist1d_args(num_samples=n, seed=seed, **overrides)
    rng = np.random.RandomState(seed)
    nu = robustness.draw_nuisance(np.repeat(np.arange(10), n // 10), rng, args)
    perm = rng.permutation(n)
    x = robustness.render(nu, args)[perm]
    x = (x - x.mean()) / x.std()
    torch.testing.assert_close(torch.as_tensor(x, dtype=torch.float32), torch.cat([ref.x, ref.x_test]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(nu.label[perm]), torch.cat([ref.y, ref.y_test]))


def test_redraw_changes_only_the_chosen_factor() -> None:
    args = mnist1d_args()
    nu = robustness.draw_nuisance(np.arange(50) % 10, np.random.RandomState(0), args)
    fields = {"shift": "shift", "scale": "u_scale", "iid_noise": "z_iid", "corr_noise": "z_corr", "shear": "u_shear"}
    assert set(fields) == set(robustness.NUISANCES)
    for factor, attr in fields.items():
        new = robustness.redraw(nu, factor, np.random.RandomState(1), {**args, "max_translation": 72})
        for other in ("label", "pad", *fields.values()):
            same = np.array_equal(getattr(new, other), getattr(nu, other))
            assert same == (other != attr), (factor, other)
    with pytest.raises(ValueError, match="factor"):
        robustness.redraw(nu, "rotation", np.random.RandomState(1), args)


def test_paired_sets_differ_only_by_the_nuisance() -> None:
    cfg = robustness.RobustnessConfig(n_pairs=40, gauss_sigmas=(0.3,), iid_noise_scale=0.02)
    x, y, pairs = robustness.paired_sets(cfg, mean=0.0, std=1.0)
    assert x.shape == (40, 40) and y.shape == (40,)
    assert set(pairs) == {*robustness.NUISANCES, "all", "gauss 0.3"}
    # Gaussian: exactly x + σ ε; iid noise at the training strength: the same signal with fresh
    # iid noise, so the difference is a noise-sized perturbation (std ≈ 0.02·√2 before resampling).
    torch.testing.assert_close((pairs["gauss 0.3"] - x).std(), torch.tensor(0.3), rtol=0.1, atol=0)
    assert 0.005 < float((pairs["iid_noise"] - x).std()) < 0.05
    for tx in pairs.values():
        assert tx.shape == x.shape and bool(torch.isfinite(tx).all())


def test_fgsm_matches_the_sign_gradient_of_a_linear_model() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    w, b = model.weight.detach(), model.bias.detach()
    # ∇_x CE(Wx + b, y) = Wᵀ (softmax(Wx + b) − onehot(y)), per sample (hand-computed).
    grad = (torch.softmax(x @ w.T + b, 1) - torch.nn.functional.one_hot(y, 3).double()) @ w
    expected = x + 0.1 * grad.sign()
    torch.testing.assert_close(robustness.fgsm(model, x, y, 0.1), expected, rtol=0, atol=0)
    assert model.weight.grad is None  # the attack leaves the parameters alone
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(robustness.fgsm(model, x, y, 1e-3)), y)) > float(loss(model(x), y))


def test_robustness_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="test_seed"):
        robustness.RobustnessConfig(test_seed=42, data_seed=42)
    with pytest.raises(ValueError, match="max_translation"):
        robustness.RobustnessConfig(max_translation=73)
    with pytest.raises(ValueError, match="arms"):
        robustness.RobustnessConfig(arms=("baseline", "sam"))
    with pytest.raises(ValueError, match="fgsm_eps"):
        robustness.RobustnessConfig(fgsm_eps=(0.0,))


# ---------------------------------------------------------------------- compactness helpers
def test_layer_metrics_match_the_spectrum() -> None:
    torch.manual_seed(0)
    n, d = 4000, 6
    z = torch.randn(n, d, dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # exact identity covariance
    lam = torch.tensor([9.0, 4.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    h = z * lam.sqrt()
    y = torch.arange(n) % 4
    m = compactness.layer_metrics(h, y, 0.95)
    assert math.isclose(m["pr"], 14.0**2 / 98.0, rel_tol=1e-9)
    p = lam[:3] / 14.0
    assert math.isclose(m["erank"], math.exp(-float((p * p.log()).sum())), rel_tol=1e-6)
    assert m["pcs"] == 3.0  # 13/14 < 0.95 ≤ 14/14
    assert compactness.layer_metrics(h, y, 0.9)["pcs"] == 2.0
    collapsed = torch.nn.functional.one_hot(y, 4).double() * 3.0
    assert compactness.layer_metrics(collapsed, y)["nc1"] == pytest.approx(0.0, abs=1e-12)
    dead = compactness.layer_metrics(torch.zeros(n, d), y)
    assert all(math.isnan(v) for v in dead.values())


def test_hidden_representations_are_the_post_activation_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(10, 4)
    reps = _common.hidden_representations(model, x, logits=True)
    assert list(reps) == ["h1", "h2", "logits"]
    h1 = torch.relu(model[0](x))
    torch.testing.assert_close(reps["h1"], h1)
    torch.testing.assert_close(reps["h2"], torch.relu(model[2](h1)))
    torch.testing.assert_close(reps["logits"], model(x))
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model)


def test_config_from_args_quick_and_precedence() -> None:
    """defaults < ``--quick`` values < explicit options; lists become tuples; the dataclass validates."""

    @dataclass(frozen=True)
    class _Cfg:
        seeds: tuple[int, ...] = (0, 1, 2)
        steps: int = 100
        progress: bool = False
        quick: bool = False

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False)
        p.add_argument("--seeds", nargs="+", type=int)
        p.add_argument("--steps", type=int)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction)
        return p

    quick = {"seeds": (0,), "steps": 10}
    assert _common.config_from_args(_Cfg, parser(), [], quick) == _Cfg()
    assert _common.config_from_args(_Cfg, parser(), ["--quick"], quick) == _Cfg(seeds=(0,), steps=10, quick=True)
    got = _common.config_from_args(_Cfg, parser(), ["--quick", "--steps", "7", "--seeds", "3", "4", "--progress"], quick)
    assert got == _Cfg(seeds=(3, 4), steps=7, progress=True, quick=True)
    assert _common.config_from_args(_Cfg, parser(), ["--no-progress"], quick).progress is False
    with pytest.raises(SystemExit):
        _common.config_from_args(_Cfg, parser(), ["--steps", "x"], quick)
    with pytest.raises(ValueError, match="seeds"):
        compactness.parse_args(["--seeds", "1", "1"])


def test_recipe_runs_are_the_trial_configs_and_the_measure_sees_the_trained_model(tmp_path: Path) -> None:
    # The runner trains every arm × seed of the recipe config as trial_config says, and the recipe's
    # measurement (in the runner) sees the model train_trial trains: compared with a direct computation.
    from canonreg.ablate import AblationSpec, run_ablation
    from canonreg.experiment import train_trial

    cfg = compactness.CompactnessConfig(arms=("baseline", "both"), seeds=(3,), num_samples=2000, width=16, steps=30, eval_every=10, max_rows=300)
    spec = _common.ablation_spec("t", cfg)
    assert AblationSpec.from_dict(spec).configs() == [_common.trial_config(cfg, a, s).resolved() for a in cfg.arms for s in cfg.seeds]
    done = run_ablation(spec, out=tmp_path, workers=0, progress=False, plots=False,
                        measure="compactness:measure_run", measure_args={"variance": 0.9, "max_rows": 300})  # fmt: skip
    runs = _common.finished_runs(done)
    assert [(t.arm, t.seed) for t, _, _ in runs] == [("baseline", 3), ("both", 3)]
    for trial, res, layers in runs:
        split = load_data(trial)
        trained = train_trial(trial, data=split)
        rows = torch.randperm(split.x.shape[0], generator=torch.Generator().manual_seed(cfg.data_seed))[:300]
        assert layers == compactness.measure(trained.model, split.x[rows], split.y[rows], 0.9)
        ref = run_trial(trial, data=split)
        assert res["test_acc"] == ref["test_acc"] and res["mean_alpha"] == ref["mean_alpha"]
        assert res["window_train_loss"] == trained.train_loss


def test_trial_config_copies_the_shared_budget() -> None:
    cfg = compactness.CompactnessConfig(steps=400, batch_size=64, width=32)
    trials = [_common.trial_config(cfg, arm, 5) for arm in ARMS]
    assert {(t.steps, t.batch_size, t.width, t.seed, t.model, t.dataset) for t in trials} == {(400, 64, 32, 5, "mlp", "mnist1d")}
    assert [t.arm for t in trials] == list(ARMS)


# ---------------------------------------------------------------------- --quick end to end
def _run_quick(recipe: str, out: Path, *options: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(RECIPES / f"{recipe}.py"), "--quick", "--out", str(out), *options],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(RECIPES.parent), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for arm in ARMS:
        assert f"| {arm} |" in proc.stdout
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS)
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["quick"] is True and result["config"]["out"] == str(out)
    assert result["recipe"] == recipe
    return result


def _finite_in(x: Any, lo: float, hi: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and lo <= x <= hi


def test_compactness_quick(tmp_path: Path) -> None:
    res = _run_quick("compactness", tmp_path)
    cfg = res["config"]
    assert (tmp_path / "compactness.png").stat().st_size > 10_000
    records = res["records"]
    assert sorted((r["arm"], r["seed"]) for r in records) == sorted((a, s) for a in ARMS for s in cfg["seeds"])
    for r in records:
        assert _finite_in(r["test_acc"], 0.0, 1.0) and _finite_in(r["mean_alpha"], -1.0, 1.0)
        assert r["test_acc"] > 0.15  # above chance (0.1) after the quick budget
        assert list(r["layers"]) == [f"h{i}" for i in range(1, cfg["depth"])]
        for m in r["layers"].values():
            assert _finite_in(m["pr"], 1.0 - 1e-9, cfg["width"]) and _finite_in(m["erank"], 1.0 - 1e-9, cfg["width"])
            assert m["pr"] <= m["erank"] + 1e-9  # participation ratio ≤ entropy rank (Rényi order)
            assert _finite_in(m["pcs"], 1, cfg["width"]) and float(m["pcs"]).is_integer()
            assert _finite_in(m["nc1"], 0.0, 1e6)
    for arm in ARMS:
        s = res["summary"][arm]
        assert len(s["test_acc"]) == 2 and _finite_in(s["test_acc"][0], 0.0, 1.0) and s["test_acc"][1] >= 0
    # a second start resumes: nothing is trained again, the same records and tables come back
    runs = (tmp_path / "runs" / "results.jsonl").read_text()
    assert len(runs.splitlines()) == len(records) and all('"measure_call"' in line for line in runs.splitlines())
    md = (tmp_path / "results.md").read_text()
    again = _run_quick("compactness", tmp_path, "--workers", "0")
    assert (tmp_path / "runs" / "results.jsonl").read_text() == runs
    assert again["records"] == records and (tmp_path / "results.md").read_text() == md


def test_robustness_quick(tmp_path: Path) -> None:
    res = _run_quick("robustness", tmp_path)
    cfg = res["config"]
    assert (tmp_path / "robustness.png").stat().st_size > 10_000
    assert (tmp_path / "invariance.png").stat().st_size > 10_000
    records = res["records"]
    assert sorted((r["arm"], r["seed"]) for r in records) == sorted((a, s) for a in ARMS for s in cfg["seeds"])
    conditions = {"clean", *robustness.NUISANCES, "all", *(f"gauss {s:g}" for s in cfg["gauss_sigmas"]), *(f"fgsm {e:g}" for e in cfg["fgsm_eps"])}
    transforms = {*robustness.NUISANCES, "all", *(f"gauss {s:g}" for s in cfg["gauss_sigmas"])}
    for r in records:
        assert set(r["acc"]) == conditions and all(_finite_in(a, 0.0, 1.0) for a in r["acc"].values())
        for c, d in r["drop"].items():
            assert math.isclose(d, 100 * (r["acc"]["clean"] - r["acc"][c]), abs_tol=1e-9)
        assert r["drop"][f"fgsm {cfg['fgsm_eps'][-1]:g}"] > 0  # FGSM must hurt
        assert set(r["invariance"]) == transforms
        for scores in r["invariance"].values():
            assert list(scores) == [*(f"h{i}" for i in range(1, cfg["depth"])), "logits"]
            assert all(_finite_in(v, 0.0, 100.0) for v in scores.values())
    assert all(_finite_in(v, 0.0, 100.0) for v in res["input_invariance"].values())


def test_crh_arm_runs_the_preset_weight_not_the_loss_arms() -> None:
    from canonreg.losses import CRH_PRESET

    cfg = compactness.CompactnessConfig()  # loss_weight None: each arm's default
    assert _common.trial_config(cfg, "loss", 0).resolved().loss_weight == 0.1
    assert _common.trial_config(cfg, "crh", 0).resolved().loss_weight == float(CRH_PRESET["weight"])
    cfg = robustness.RobustnessConfig(loss_weight=0.3)  # a given λ: every loss arm's (as in gamma_scaling)
    assert {_common.trial_config(cfg, a, 0).resolved().loss_weight for a in ("loss", "both", "crh")} == {0.3}
