"""The main job (``python -m canonreg demo``): baseline and crh arm side by side, measured after training.

Structure and correctness only — the crh preset's strength may change, so no α value is asserted:
both tables and their difference are printed, the difference is crh − baseline cell by cell,
α is the task-only post-training measurement on the full training set (re-measured independently
here), ``summary.json`` records the configs actually used, and the figure is written.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from canonreg import RELATIONS, measure_crh
from canonreg.cli import DEMO_ARMS, DemoConfig, alignment_difference, main
from canonreg.experiment import TrialConfig, evaluate, load_data, train_trial
from canonreg.layers import layer_roles

TINY = ["--steps", "24", "--window", "12", "--width", "16", "--depth", "4", "--num-samples", "600", "--batch-size", "64"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny demo run: its output folder and what it printed."""
    import contextlib
    import io

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["demo", *TINY, "--threads", "1", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return out, buf.getvalue()


def _num(cell: str) -> float:
    return math.nan if cell == "nan" else float(cell)


def _printed_table(printed: str, title: str) -> dict[str, list[float]]:
    """Parse the table printed under ``title``: {layer: [six relations, last column]}."""
    lines = printed.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    head = lines[start + 1].split()
    assert head[:2] == ["layer", "role"] and head[2:8] == list(RELATIONS)
    rows: dict[str, list[float]] = {}
    for ln in lines[start + 2 :]:
        if not ln.strip():
            break
        cells = ln.split()
        rows[cells[0]] = [_num(c) for c in cells[2:]]
    return rows


def test_demo_prints_both_tables_and_their_difference(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    summary = json.loads((out / "summary.json").read_text())
    layers = summary["layers"]
    assert layers == ["0", "2", "4", "6"]  # an MLP of depth 4: Linear layers of nn.Sequential
    tables = {arm: _printed_table(printed, f"{arm}: test accuracy") for arm in DEMO_ARMS}
    diff = _printed_table(printed, "difference crh − baseline")
    for arm in DEMO_ARMS:
        assert list(tables[arm]) == layers
        for n in layers:
            alpha = summary["arms"][arm]["alignment"][n]
            for j, r in enumerate(RELATIONS):
                assert tables[arm][n][j] == pytest.approx(alpha[r], abs=5e-4)  # printed with 3 decimals
            assert tables[arm][n][6] == pytest.approx(min(alpha[r] for r in RELATIONS), abs=5e-4)
    for n in layers:
        for j, r in enumerate(RELATIONS):
            expected = summary["arms"]["crh"]["alignment"][n][r] - summary["arms"]["baseline"]["alignment"][n][r]
            assert summary["difference"][n][r] == pytest.approx(expected, abs=1e-12)
            assert diff[n][j] == pytest.approx(expected, abs=5e-4)
    # The summary rows: both arms and the difference column.
    for label, key in (("test accuracy", "test_accuracy"), ("min α (inner layers", "min_alpha_inner"), ("min α (first layer", "min_alpha_first")):
        row = next(ln for ln in printed.splitlines() if ln.startswith(label))
        a, b, d = (float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)[-3:])
        assert a == pytest.approx(summary["arms"]["baseline"][key], abs=5e-4)
        assert b == pytest.approx(summary["arms"]["crh"][key], abs=5e-4)
        assert d == pytest.approx(b - a, abs=1.5e-3)


def test_demo_alpha_is_task_only_after_training_on_the_training_set(demo_run: tuple[Path, str]) -> None:
    # Independent reference: train each arm again from the recorded config with the shared loop and
    # measure it with measure_crh on every training sample; the demo's numbers must be these.
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for arm in DEMO_ARMS:
            trial = TrialConfig.from_dict(summary["trials"][arm])
            assert trial.arm == arm
            data = load_data(trial)
            model = train_trial(trial, data=data).model
            ref = measure_crh(model, data.x, data.y, preprocess=trial.preprocess, metric=trial.metric)  # type: ignore[arg-type]
            got = summary["arms"][arm]["alignment"]
            for n in ref.layers:
                for r in RELATIONS:
                    want = ref.alignment[n][r]
                    assert (got[n][r] is None and math.isnan(want)) or got[n][r] == pytest.approx(want, abs=1e-6)
            acc = evaluate(model, data)
            assert summary["arms"][arm]["test_accuracy"] == pytest.approx(acc["test_acc"], abs=1e-9)
            assert summary["measurement"]["samples"] == data.x.shape[0] == summary["train_samples"]
    finally:
        torch.set_num_threads(before)


def test_demo_summary_records_the_config_actually_used(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert (cfg["steps"], cfg["width"], cfg["depth"], cfg["batch_size"], cfg["num_samples"]) == (24, 16, 4, 64, 600)
    assert summary["train_samples"] == 480 and summary["test_samples"] == 120
    demo = DemoConfig(**cfg)
    for arm in DEMO_ARMS:
        trial = summary["trials"][arm]
        assert trial == demo.trial(arm).to_dict()
        # The same budget in both arms: everything but the arm and the loss's strength is shared.
        shared = {k: v for k, v in trial.items() if k not in ("arm", "loss_weight")}
        assert shared == {k: v for k, v in summary["trials"]["baseline"].items() if k not in ("arm", "loss_weight")}
    assert summary["trials"]["crh"]["loss_weight"] == demo.crh_weight and summary["trials"]["baseline"]["loss_weight"] == 0.0
    assert summary["roles"] == layer_roles(summary["layers"]) == {"0": "first", "2": "inner", "4": "inner", "6": "head"}
    assert summary["inner_layers"] == ["2", "4"]
    for arm in DEMO_ARMS:
        a = summary["arms"][arm]
        inner = [a["alignment"][n][r] for n in ("2", "4") for r in RELATIONS]
        assert a["min_alpha_inner"] == pytest.approx(min(inner))
        assert a["min_alpha_first"] == pytest.approx(min(a["alignment"]["0"][r] for r in RELATIONS))
        assert [h["step"] for h in a["history"]] == [12, 24]
        assert all("min_alpha_inner" in h for h in a["history"])  # task-only α during training, for the figure
    for arm in DEMO_ARMS:
        report = json.loads((out / f"report_{arm}.json").read_text())
        assert report["alignment"] == summary["arms"][arm]["alignment"]


def test_demo_writes_the_comparison_figure(demo_run: tuple[Path, str]) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (recipes/test extra)")
    out, printed = demo_run
    png = (out / "crh_comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    assert json.loads((out / "summary.json").read_text())["figures"] == [str(out / "crh_comparison.png")]
    assert "crh_comparison.png" in printed


def test_plot_comparison_panels() -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (recipes/test extra)")
    from canonreg.plotting import _plt, plot_comparison

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    a = measure_crh(model, x, y)
    with torch.no_grad():
        model[2].weight.mul_(2.0).add_(0.3)
    b = measure_crh(model, x, y)
    hist = {"a": [{"step": 1, "min_alpha_inner": 0.2, "mean_alpha_post": 0.4}], "b": [{"step": 1, "min_alpha_inner": 0.3, "mean_alpha_post": 0.5}]}
    fig = plot_comparison({"a": a, "b": b}, history=hist)
    try:
        diff_ax = fig.axes[2]
        assert diff_ax.get_title() == "difference b − a"
        data = diff_ax.images[0].get_array()
        expected = alignment_difference(a, b)
        for i, n in enumerate(a.layers):
            for j, r in enumerate(RELATIONS):
                assert float(data[i, j]) == pytest.approx(expected[n][r], abs=1e-12)
        texts = {t.get_text() for t in diff_ax.texts}
        assert f"{expected['2']['f-RWA']:+.2f}" in texts
        assert len(fig.axes[3].get_lines()) == 4  # min and mean α for each report
    finally:
        _plt().close(fig)
    with pytest.raises(ValueError, match="exactly two"):
        plot_comparison({"a": a})


def test_demo_config_defaults_are_valid_and_mapped() -> None:
    d = DemoConfig()
    base, crh = (d.trial(arm) for arm in DEMO_ARMS)
    assert (base.arm, crh.arm) == DEMO_ARMS
    assert (base.steps, base.batch_size, base.width, base.depth) == (d.steps, d.batch_size, d.width, d.depth)
    from canonreg.losses import CRH_PRESET

    assert d.loss_weight is None and crh.loss_weight == d.crh_weight == CRH_PRESET["weight"]  # the preset's strength
    assert base.loss_weight == 0.0 and DemoConfig(loss_weight=0.25).trial("crh").loss_weight == 0.25
    with pytest.raises(ValueError, match="`steps`"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="`window`"):
        DemoConfig(steps=10, window=20)
    with pytest.raises(ValueError, match="`depth`"):
        DemoConfig(depth=2)  # no inner layer to compare


def test_module_entry_point_help() -> None:
    res = subprocess.run([sys.executable, "-m", "canonreg", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "--weight-decay" in res.stdout and "--loss-weight" in res.stdout


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--quick"], (300, 100, 2000)),
        (["--quick", "--steps", "2000", "--window", "500", "--num-samples", "5000"], (2000, 500, 5000)),  # = defaults: still win
        (["--quick", "--steps", "50"], (50, 50, 2000)),  # the window follows the steps it was not given
        ([], (DemoConfig().steps, DemoConfig().window, DemoConfig().num_samples)),
        (["--window", "10"], (DemoConfig().steps, 10, DemoConfig().num_samples)),
    ],
)
def test_demo_quick_keeps_every_flag_given_explicitly(args: list[str], want: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    import canonreg.cli as cli

    seen: list[DemoConfig] = []
    monkeypatch.setattr(cli, "run_demo", seen.append)
    assert main(["demo", *args]) == 0
    assert (seen[0].steps, seen[0].window, seen[0].num_samples) == want
