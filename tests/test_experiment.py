"""canonreg.experiment: config validation, the four arms, the shared training loop and its metrics.

Trials are tiny (digits, width 16, a few dozen steps) so the file runs in seconds on 2 cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import canonreg
from canonreg.experiment import (
    ARMS,
    TrialConfig,
    TrialEvent,
    build_model,
    config_id,
    evaluate,
    load_data,
    make_arm,
    run_trial,
    scalar_metrics,
    train_trial,
)
from canonreg.layers import select_layers

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn (test extra)")

TINY = dict(dataset="digits", width=16, depth=3, batch_size=32, steps=24, eval_every=8, lr=0.05, n_bootstrap=0)
TIMING = ("wall_time_s", "train_time_s", "cpu_time_s")


pytestmark = pytest.mark.usefixtures("single_thread")  # trials run single-threaded, as in the workers



def tiny(**kw: object) -> TrialConfig:
    return TrialConfig(**{**TINY, **kw})  # type: ignore[arg-type]


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


@pytest.fixture(scope="module")
def digits_split() -> canonreg.data.Split:
    return load_data(tiny())


# ---------------------------------------------------------------------- TrialConfig
@pytest.mark.parametrize(
    "changes, error, name",
    [
        ({"arm": "sam"}, ValueError, "arm"),
        ({"arm": 3}, TypeError, "arm"),
        ({"dataset": "cifar10"}, ValueError, "dataset"),
        ({"model": "vit"}, ValueError, "model"),
        ({"optimizer": "lbfgs"}, ValueError, "optimizer"),
        ({"width": 0}, ValueError, "width"),
        ({"width": 16.0}, TypeError, "width"),
        ({"depth": True}, TypeError, "depth"),
        ({"steps": -3}, ValueError, "steps"),
        ({"seed": -1}, ValueError, "seed"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"lr": float("nan")}, TypeError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
        ({"noise": "high"}, ValueError, "noise"),
        ({"noise": -0.5}, ValueError, "noise"),
        ({"loss_weight": -1.0}, ValueError, "loss_weight"),
        ({"relations": "f-RWA"}, TypeError, "relations"),
        ({"relations": ("f-RWA", "x-RWA")}, ValueError, "relations"),
        ({"relations": ("f-RWA", "f-RWA")}, ValueError, "relations"),
        ({"arm": "loss", "relations": ()}, ValueError, "relations"),
        ({"loss_metric": "l2"}, ValueError, "loss_metric"),
        ({"preprocess": "whitened"}, ValueError, "preprocess"),
        ({"metric": "spearman"}, ValueError, "metric"),
        ({"eval_every": 25}, ValueError, "eval_every"),
        ({"monitor_every": 9}, ValueError, "monitor_every"),
        ({"alpha_threshold": 1.5}, ValueError, "alpha_threshold"),
        ({"model": "resmlp", "depth": 2}, ValueError, "depth"),
        ({"arm": "noise", "noise": "auto", "weight_decay": 0.0}, ValueError, "weight_decay"),
    ],
)
def test_bad_fields_are_rejected_naming_the_field(changes: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=f"`{name}`"):
        tiny(**changes)


def test_numbers_and_lists_are_normalised_so_ids_are_stable() -> None:
    a = tiny(lr=1, relations=["f-RWA", "b-RWA"], arm="loss")
    b = tiny(lr=1.0, relations=("f-RWA", "b-RWA"), arm="loss")
    assert isinstance(a.lr, float) and a.relations == ("f-RWA", "b-RWA")
    assert a == b and config_id(a) == config_id(b)
    assert len(config_id(a)) == 16
    assert config_id(a) != config_id(a.replace(seed=1))


def test_resolved_neutralises_factors_that_do_not_act() -> None:
    base = tiny(arm="baseline", noise=0.5, loss_weight=3.0, relations=("f-RGA",))
    r = base.resolved()
    assert (r.noise, r.loss_weight, r.relations) == (0.0, 0.0, ())
    assert config_id(base) == config_id(tiny(arm="baseline", noise="auto"))
    noise = tiny(arm="noise", noise=0.5, loss_weight=3.0).resolved()
    assert noise.noise == 0.5 and noise.loss_weight == 0.0
    loss = tiny(arm="loss", noise=0.5, loss_weight=3.0).resolved()
    assert loss.noise == 0.0 and loss.loss_weight == 3.0
    assert tiny(optimizer="adam", momentum=0.5).resolved().momentum == 0.0
    assert config_id(tiny(arm="noise", noise=0.5)) != config_id(tiny(arm="noise", noise=1.0))
    # digits is a fixed data set: num_samples does not act there (two levels of it ran the same trial twice)
    assert config_id(tiny(dataset="digits", num_samples=1000)) == config_id(tiny(dataset="digits", num_samples=3000))
    assert config_id(tiny(dataset="mnist1d", num_samples=1000)) != config_id(tiny(dataset="mnist1d", num_samples=3000))


def test_dict_round_trip_and_unknown_keys() -> None:
    cfg = tiny(arm="both", noise=0.3)
    assert TrialConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="wdecay"):
        TrialConfig.from_dict({"wdecay": 0.1})


# ---------------------------------------------------------------------- models and arms
@pytest.mark.parametrize("model, depth", [("mlp", 3), ("resmlp", 4), ("cnn1d", 3)])
def test_build_model_has_depth_weight_layers_and_is_seeded(model: str, depth: int) -> None:
    cfg = tiny(model=model, depth=depth)
    rng_before = torch.random.get_rng_state()
    m1 = build_model(cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is untouched
    layers, _, _ = select_layers(m1, None)
    assert len(layers) == depth
    assert isinstance(list(layers.values())[-1], nn.Linear)
    m2 = build_model(cfg)
    m3 = build_model(cfg.replace(seed=1))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert m1(torch.randn(5, 64)).shape == (5, 10)


def _decay_by_param(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("optimizer, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_baseline_decays_matrices_only(optimizer: str, kind: type) -> None:
    cfg = tiny(optimizer=optimizer, weight_decay=3e-3)
    model = build_model(cfg)
    opt, align = make_arm(cfg, model)
    assert align is None and type(opt) is kind
    decay = _decay_by_param(opt)
    assert len(decay) == len(list(model.parameters()))
    for p in model.parameters():
        assert decay[id(p)] == (3e-3 if p.dim() >= 2 else 0.0)


def test_loss_and_noise_arms_build_the_wrappers() -> None:
    from canonreg.losses import AlignmentLoss
    from canonreg.optim import NoiseCalibrated

    cfg = tiny(arm="both", weight_decay=2e-3, noise=0.7, relations=("f-RWA", "b-GWA"), loss_weight=0.3)
    model = build_model(cfg)
    opt, align = make_arm(cfg, model)
    try:
        assert isinstance(align, AlignmentLoss) and align.attached
        assert align.relations == ("f-RWA", "b-GWA") and align.weight == 0.3
        assert isinstance(opt, NoiseCalibrated)
        assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # the wrapper decays, not the base
        assert all(g["nc_weight_decay"] == 2e-3 and g["nc_noise"] == 0.7 for g in opt.param_groups)
    finally:
        assert align is not None
        align.detach()
        opt.detach()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the trial
def test_run_trial_result_is_complete_consistent_and_json_ready(digits_split: canonreg.data.Split) -> None:
    cfg = tiny(steps=20, eval_every=8, alpha_threshold=-1.0)
    r = run_trial(cfg, data=digits_split)
    json.dumps(r, allow_nan=False)
    assert r["run_id"] == config_id(cfg) and r["config"] == cfg.resolved().to_dict()
    assert [h["step"] for h in r["history"]] == [4, 12, 20]  # windows end at `steps`
    assert r["history"][-1]["mean_alpha"] == pytest.approx(r["window_mean_alpha"], abs=0)
    assert r["steps_to_alpha"] == 4  # threshold -1 is reached at the first window
    assert r["layers"] == ["0", "2", "4"] and r["hidden_layers"] == ["2", "4"] and r["penultimate"] == "4"
    for layer in r["layers"]:
        assert set(r["alpha"][layer]) == set(canonreg.RELATIONS)
        assert all(-1 <= a <= 1 for a in r["alpha"][layer].values())
        assert set(r["balance"][layer]) >= {"decay", "drift", "noise", "noise_share"}
    assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
    assert r["optimizer_balance"] is None
    m = scalar_metrics(r)
    from canonreg.experiment import LAYER_METRIC_PREFIXES, STATIC_METRICS

    assert set(STATIC_METRICS) <= set(m)
    assert all(k in STATIC_METRICS or k.startswith(LAYER_METRIC_PREFIXES) for k in m)
    assert r["cpu_time_s"] > 0
    assert m["alpha@2"] == pytest.approx(np.mean(list(r["alpha"]["2"].values())))
    assert m["erank_penultimate"] == r["erank"]["4"] and m["pcs95@2"] == r["pcs95"]["2"]


def test_reported_alpha_is_the_post_training_task_only_measurement(digits_split: canonreg.data.Split) -> None:
    # Reference: a plain loop over the training set with a fresh monitor on the trained model and the
    # task loss alone. In the loss arm the training monitor's G also holds the regulariser's gradient,
    # so its window α must differ from the reported one.
    cfg = tiny(arm="loss", steps=16, eval_every=8, loss_weight=1.0, relations=("f-RWA", "b-GWA"), weight_decay=1e-3)
    r = run_trial(cfg, data=digits_split)
    model = train_trial(cfg, data=digits_split).model
    ref_monitor = canonreg.CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric, track_balance=False)
    with ref_monitor:
        for i in range(0, len(digits_split.y), 100):
            torch.nn.functional.cross_entropy(model(digits_split.x[i : i + 100]), digits_split.y[i : i + 100]).backward()
    ref = ref_monitor.compute(exponents=False)
    for layer in r["layers"]:
        for rel in canonreg.RELATIONS:
            assert r["alpha"][layer][rel] == pytest.approx(ref.alignment[layer][rel], abs=1e-6)
    assert r["inner_layers"] == ["2"] and r["min_alpha_inner"] == pytest.approx(min(ref.alignment["2"].values()), abs=1e-6)
    assert r["window_alpha"] != r["alpha"]


def test_track_crh_adds_post_hoc_alpha_without_changing_training(digits_split: canonreg.data.Split) -> None:
    cfg = tiny(arm="loss", steps=16, eval_every=8, loss_weight=1.0, weight_decay=1e-3)
    plain = run_trial(cfg, data=digits_split)
    tracked = run_trial(cfg.replace(track_crh=True), data=digits_split)
    assert tracked["alpha"] == plain["alpha"] and tracked["test_acc"] == plain["test_acc"]
    assert all(-1 <= h["min_alpha_inner"] <= h["mean_alpha_post"] <= 1 for h in tracked["history"])
    assert tracked["history"][-1]["min_alpha_inner"] == pytest.approx(tracked["min_alpha_inner"], abs=1e-9)


def test_threshold_never_reached_gives_none(digits_split: canonreg.data.Split) -> None:
    r = run_trial(tiny(steps=8, eval_every=8, alpha_threshold=1.0), data=digits_split)
    assert r["steps_to_alpha"] is None and math.isnan(scalar_metrics(r)["steps_to_alpha"])


def test_run_trial_is_deterministic(digits_split: canonreg.data.Split) -> None:
    cfg = tiny(arm="both", noise=0.5, steps=16)
    a = run_trial(cfg, data=digits_split)
    b = run_trial(cfg, data=digits_split)
    assert without_timing(a) == without_timing(b)
    c = run_trial(cfg.replace(seed=1), data=digits_split)
    assert c["mean_alpha"] != a["mean_alpha"]


def test_zero_strength_arms_reproduce_the_baseline_bit_for_bit(digits_split: canonreg.data.Split) -> None:
    """Same budget and common random numbers: an arm whose addition is switched off is the baseline."""
    base = run_trial(tiny(arm="baseline", weight_decay=1e-3), data=digits_split)
    loss0 = run_trial(tiny(arm="loss", weight_decay=1e-3, loss_weight=0.0), data=digits_split)
    keep = ("train_acc", "test_acc", "train_loss", "test_loss", "alpha", "history", "erank", "nc1", "balance")
    assert {k: base[k] for k in keep} == {k: loss0[k] for k in keep}
    # Without decay and with zero noise, the wrapper step is the base SGD step.
    base_nd = run_trial(tiny(arm="baseline", weight_decay=0.0), data=digits_split)
    noise0 = run_trial(tiny(arm="noise", weight_decay=0.0, noise=0.0), data=digits_split)
    assert {k: base_nd[k] for k in keep} == {k: noise0[k] for k in keep}
    assert noise0["optimizer_balance"] is not None
    # And an active arm does change the training.
    loss = run_trial(tiny(arm="loss", weight_decay=1e-3, loss_weight=1.0), data=digits_split)
    assert loss["alpha"] != base["alpha"]


def test_evaluate_matches_a_direct_computation(digits_split: canonreg.data.Split) -> None:
    trained = train_trial(tiny(steps=16), data=digits_split)
    model = trained.model
    ev = evaluate(model, digits_split)
    x, y = digits_split.x_test, digits_split.y_test
    with torch.no_grad():
        h1 = torch.relu(model[0](x))  # input of layer "2"
        h2 = torch.relu(model[2](h1))  # input of layer "4" (penultimate)
        acc = float((model[4](h2).argmax(1) == y).double().mean())
    assert ev["test_acc"] == pytest.approx(acc, abs=1e-12)
    for name, h in (("2", h1), ("4", h2)):
        lam = np.clip(np.linalg.eigvalsh(np.cov(h.double().numpy(), rowvar=False)), 0, None)
        assert ev["erank"][name] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-9)
        frac = np.cumsum(np.sort(lam)[::-1]) / lam.sum()
        assert ev["pcs95"][name] == int(np.searchsorted(frac, 0.95 - 1e-12) + 1)
    # NC1 on the test split, written out with per-class loops.
    feats = h2.double().numpy()
    labels = y.numpy()
    classes = np.unique(labels)
    mu = feats.mean(0)
    sw = sum(np.cov(feats[labels == c], rowvar=False, bias=True) for c in classes) / len(classes)
    sb = sum(np.outer(feats[labels == c].mean(0) - mu, feats[labels == c].mean(0) - mu) for c in classes) / len(classes)
    ref = np.trace(sw @ np.linalg.pinv(sb, hermitian=True)) / len(classes)
    assert ev["nc1_test"] == pytest.approx(ref, rel=1e-6)


def test_callback_sees_every_window_and_works_with_a_writer(digits_split: canonreg.data.Split, tmp_path) -> None:
    from canonreg.writers import CSVWriter

    events: list[TrialEvent] = []
    with CSVWriter(tmp_path / "log.csv") as log:

        def both(e: TrialEvent) -> None:
            events.append(e)
            log.log_event(e)

        r = run_trial(tiny(arm="noise", noise=0.5, steps=16), data=digits_split, callback=both)
    assert [e.step for e in events] == [8, 16] and [e.final for e in events] == [False, True]
    assert events[-1].report.mean_alignment() == pytest.approx(r["window_mean_alpha"], abs=0)
    assert events[-1].optimizer_balance is not None
    text = (tmp_path / "log.csv").read_text()
    assert "monitor_balance/noise_share" in text and "balance/noise_share" in text and "train_loss" in text


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_runs_and_reports_its_balance(arm: str, digits_split: canonreg.data.Split) -> None:
    r = run_trial(tiny(arm=arm, noise=0.5, steps=16), data=digits_split)
    assert [h["step"] for h in r["history"]] == [8, 16]
    assert (r["optimizer_balance"] is not None) == (arm in ("noise", "both"))
    assert sum(1 for h in r["history"] if math.isfinite(h["train_loss"])) == 2


def test_user_model_and_data_factories_and_threads(digits_split: canonreg.data.Split) -> None:
    built: list[TrialConfig] = []

    def model_fn(cfg: TrialConfig) -> nn.Module:
        built.append(cfg)
        return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 10))

    cfg = tiny(steps=16, eval_every=8)
    before = torch.get_num_threads()
    a = run_trial(cfg, data=lambda c: digits_split, model_fn=model_fn, threads=1)
    b = run_trial(cfg, data=digits_split, model_fn=model_fn)
    assert torch.get_num_threads() == before and a["threads"] == 1
    assert len(built) == 2 and built[0] == cfg.resolved()
    assert a["layers"] == ["0", "2", "4"] and a["inner_layers"] == ["2"]
    assert without_timing(a) | {"threads": 0} == without_timing(b) | {"threads": 0}  # seeded init: same run
    with pytest.raises(TypeError, match="model_fn"):
        run_trial(cfg, data=digits_split, model_fn=lambda c: "not a model")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="data"):
        run_trial(cfg, data=lambda c: (digits_split.x, digits_split.y))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="threads"):
        run_trial(cfg, data=digits_split, threads=0)


def test_loss_weight_default_is_the_arms_own() -> None:
    from canonreg.losses import CRH_PRESET

    assert tiny(arm="loss").resolved().loss_weight == 0.1
    assert tiny(arm="crh").resolved().loss_weight == float(CRH_PRESET["weight"])
    assert tiny(arm="crh", loss_weight=0.5).resolved().loss_weight == 0.5
    assert tiny(arm="baseline").resolved().loss_weight == 0.0
    assert tiny(arm="crh", relations=("f-RGA",)).resolved().relations == ()
    with pytest.raises(ValueError, match="loss_weight"):
        tiny(arm="crh", loss_weight=-1.0)


def test_batch_indices_are_the_epoch_permutation_loop() -> None:
    from canonreg.experiment import batch_indices

    # Reference: the loop written out — a fresh permutation per epoch, the incomplete tail dropped.
    order = torch.Generator().manual_seed(7)
    perm, pos, ref = torch.randperm(10, generator=order), 0, []
    for _ in range(9):
        if pos + 3 > 10:
            perm, pos = torch.randperm(10, generator=order), 0
        ref.append(perm[pos : pos + 3])
        pos += 3
    got = batch_indices(10, 3, 7)
    for r in ref:
        assert torch.equal(next(got), r)
    assert torch.equal(next(batch_indices(4, 4, 0)).sort().values, torch.arange(4))
    for bad in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            next(batch_indices(10, bad, 0))  # type: ignore[arg-type]
