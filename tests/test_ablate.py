"""canonreg.ablate: config validation, the grid, resuming, summaries, plots, backends and the CLI.

Grids are tiny (digits, width 12, 12 steps) so that the whole file runs in well under a minute on
2 cores; worker-process and Ray runs use 2-run grids.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from canonreg import ablate
from canonreg.ablate import AblationSpec, load_results, main, mean_ci, run_ablation, t_quantile
from canonreg.experiment import TrialConfig, config_id, scalar_metrics

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn (test extra)")

ROOT = Path(__file__).resolve().parents[1]
FIXED = {"dataset": "digits", "width": 12, "depth": 3, "batch_size": 32, "steps": 12, "eval_every": 6, "n_bootstrap": 0}


pytestmark = pytest.mark.usefixtures("single_thread")  # trials run single-threaded, as in the workers



def grid_config(**grid: list[Any]) -> dict[str, Any]:
    return {
        "ablation": {"name": "tiny", "metrics": ["test_acc", "mean_alpha", "erank_penultimate"]},
        "fixed": dict(FIXED),
        "grid": grid or {"arm": ["baseline", "loss"], "seed": [0, 1]},
    }


def run(config: Any, out: Path, **kw: Any) -> ablate.AblationResult:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return run_ablation(config, out=out, **kw)


def strip_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ablate.TIMING_KEYS}


# ---------------------------------------------------------------------- statistics
def test_t_quantile_matches_tables() -> None:
    # Two-sided 95% critical values from standard tables (canonreg.ablate re-exports canonreg.stats').
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 30: 2.0423}
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    with pytest.raises(ValueError, match="`df`"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="`p`"):
        t_quantile(1.3, 3)


def test_mean_ci() -> None:
    xs = [0.71, 0.74, 0.69, 0.80]
    iv = mean_ci(xs)
    m, s = np.mean(xs), np.std(xs, ddof=1)
    assert iv.mean == pytest.approx(m) and iv.n == 4
    assert iv.high - m == pytest.approx(3.182446305284263 * s / 2)
    assert mean_ci([1.0, float("nan"), None, 3.0]).n == 2  # type: ignore[list-item]
    one = mean_ci([2.0])
    assert one.mean == 2.0 and math.isnan(one.low) and one.n == 1
    assert mean_ci([]).n == 0


# ---------------------------------------------------------------------- validation
def _with(path: str, value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(grid_config())
    table, _, key = path.partition(".")
    if key:
        cfg.setdefault(table, {})[key] = value
    else:
        cfg[table] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, error, named",
    [
        ("grid.dropout", [0.1], ValueError, "grid.dropout"),
        ("grid.seed", [], ValueError, "grid.seed"),
        ("grid.seed", 3, TypeError, "grid.seed"),
        ("grid.seed", [0, 0], ValueError, "grid.seed"),
        ("grid.momentum", ["high"], TypeError, "`momentum`"),
        ("grid.weight_decay", [1e-3, -1.0], ValueError, "`weight_decay`"),
        ("grid.relations", ["f-RWA", "b-RWA"], TypeError, "grid.relations"),
        ("grid", {}, ValueError, "`grid`"),
        ("fixed.steps", [10, 20], TypeError, "fixed.steps"),
        ("fixed.arm", "baseline", ValueError, "appear in both"),
        ("fixed.lr_schedule", "cosine", ValueError, "fixed.lr_schedule"),
        ("fixed.eval_every", 100, ValueError, "`eval_every`"),
        ("ablation.workers", -1, ValueError, "ablation.workers"),
        ("ablation.backend", "dask", ValueError, "ablation.backend"),
        ("ablation.logs", "wandb", ValueError, "ablation.logs"),
        ("ablation.metrics", ["accuracy"], ValueError, "ablation.metrics"),
        ("ablation.color", "red", ValueError, "ablation.color"),
        ("plot", [{"metric": "test_acc", "factor": "weight_decay"}], ValueError, "plot[0].factor"),
        ("plot", [{"metric": "test_acc"}], ValueError, "plot[0]"),
        ("plot", [{"metric": "test_acc", "factor": "arm"}], ValueError, "plot[0].factor"),  # failed after every run
        ("plot", [{"metric": "erank@0", "factor": "arm"}], ValueError, "plot[0]"),
        ("ablation.metrics", ["test_acc", "test_acc"], ValueError, "ablation.metrics"),
        ("ablation.metrics", ["alpha@99"], ValueError, "ablation.metrics"),
        ("ablation.metrics", ["erank@0"], ValueError, "ablation.metrics"),  # the first layer's input is the data
        ("fixed.batch_size", 100000, ValueError, "`batch_size` <= the 1437 training samples of 'digits'"),
        ("quick.stepz", 3, ValueError, "quick.stepz"),
        ("quick.steps", 0, ValueError, "`steps`"),
        ("search", {"lr": [1]}, ValueError, "search"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(path: str, value: Any, error: type, named: str, tmp_path: Path) -> None:
    cfg = _with(path, value)
    with pytest.raises(error) as info:
        run(cfg, tmp_path / "out")
    assert named in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_bad_toml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nseed = [0, 1\n")
    with pytest.raises(ValueError, match="Invalid TOML"):
        ablate.load_spec(bad)
    with pytest.raises(FileNotFoundError):
        ablate.load_spec(tmp_path / "nope.toml")
    bad.write_text('[grid]\narm = ["baseline"]\nwidht = [8]\n')
    assert main([str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "grid.widht" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_grid_is_resolved_and_deduplicated() -> None:
    spec = AblationSpec.from_dict(grid_config(arm=["baseline", "loss", "noise", "both"], noise=["auto", 0.5], seed=[0, 1]))
    configs = spec.configs()
    per_arm = {a: sum(c.arm == a for c in configs) for a in ("baseline", "loss", "noise", "both")}
    assert per_arm == {"baseline": 2, "loss": 2, "noise": 4, "both": 4}  # noise does not act without the wrapper
    assert len({config_id(c) for c in configs}) == len(configs)
    assert {(c.steps, c.batch_size) for c in configs} == {(12, 32)}  # the same budget in every arm
    assert spec.varying(configs) == ("arm", "noise", "seed")
    assert spec.plot_specs(configs) == ()  # noise mixes "auto" with numbers: no default numeric plot
    rel = AblationSpec.from_dict(grid_config(arm=["loss"], relations=[["f-RWA"], ["f-RGA", "b-RGA"]]))
    assert [c.relations for c in rel.configs()] == [("f-RWA",), ("f-RGA", "b-RGA")]


def test_quick_overrides() -> None:
    cfg = grid_config(arm=["baseline", "loss"], seed=[0, 1, 2])
    cfg["quick"] = {"steps": 6, "seed": [5], "relations": ["f-RGA"]}
    spec = AblationSpec.from_dict(cfg)
    assert AblationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    q = spec.with_quick()
    configs = q.configs()
    assert len(spec.configs()) == 6 and len(configs) == 2
    assert {c.seed for c in configs} == {5} and {c.steps for c in configs} == {6}
    assert [c.relations for c in configs if c.arm == "loss"] == [("f-RGA",)]


def test_example_config_is_valid() -> None:
    spec = ablate.load_spec(ROOT / "examples" / "ablation.toml")
    configs = spec.configs()
    assert len(configs) == 24 and {c.arm for c in configs} == {"baseline", "loss", "noise", "both"}
    assert len({(c.steps, c.batch_size) for c in configs}) == 1
    quick = spec.with_quick().configs()
    assert len(quick) == 8 and max(c.steps for c in quick) <= 100


def test_crh_example_config_is_valid() -> None:
    from canonreg.losses import CRH_PRESET

    spec = ablate.load_spec(ROOT / "examples" / "crh.toml")
    configs = spec.configs()
    assert len(configs) == 6 and {c.arm for c in configs} == {"baseline", "crh"}
    assert len({(c.steps, c.batch_size, c.width, c.depth) for c in configs}) == 1  # the same budget
    assert {c.loss_weight for c in configs if c.arm == "crh"} == {CRH_PRESET["weight"]}
    quick = spec.with_quick().configs()
    assert len(quick) == 2 and {c.steps for c in quick} == {300}


# ---------------------------------------------------------------------- running, resuming
def test_code_fingerprint() -> None:
    fp = ablate.code_fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert ablate.code_fingerprint() == fp


def test_run_summarise_plot_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed fingerprint: the shared development tree may change between the runs below.
    monkeypatch.setattr(ablate, "code_fingerprint", lambda: "c0de" * 4)
    out = tmp_path / "abl"
    res = run(grid_config(), out)
    assert (res.new_runs, res.skipped_runs, res.failures) == (4, 0, {})
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = load_results(out / "results.jsonl")
    assert set(records) == {config_id(c) for c in res.configs}
    for rid, rec in records.items():
        assert config_id(TrialConfig.from_dict(rec["config"])) == rid
        assert rec["env"]["torch"] and "test_acc" in rec["result"]

    # Summary: one row per arm, mean and t-interval over the two seeds, equal to a direct reduction.
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["arm"] for r in rows] == ["baseline", "loss"]
    for row in rows:
        vals = [scalar_metrics(r["result"])["mean_alpha"] for r in records.values() if r["config"]["arm"] == row["arm"]]
        assert float(row["mean_alpha_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        half = 12.706204736174698 * np.std(vals, ddof=1) / math.sqrt(2)
        assert float(row["mean_alpha_ci_high"]) == pytest.approx(np.mean(vals) + half, rel=1e-9)
        assert row["runs"] == "2" and row["mean_alpha_n"] == "2"
    md = (out / "summary.md").read_text()
    assert "| arm | runs | test_acc | mean_alpha | erank_penultimate |" in md
    assert md.count("\n| baseline |") == 1 and md.count("\n| loss |") == 1 and " ± " in md
    assert res.markdown in md

    # Resume: nothing runs again; the file is untouched.
    before = (out / "results.jsonl").read_bytes()
    again = run(grid_config(), out)
    assert (again.new_runs, again.skipped_runs) == (0, 4)
    assert (out / "results.jsonl").read_bytes() == before

    # A crash mid-write leaves a partial line: it is moved aside with a warning naming it, earlier
    # lines are kept, and an extended grid runs only what is new.
    with open(out / "results.jsonl", "a") as f:
        f.write('{"run_id": "0123", "config": {"arm": "bas')
    with pytest.warns(RuntimeWarning, match="line 5 of .* is incomplete"):
        more = run(grid_config(arm=["baseline", "loss"], seed=[0, 1, 2]), out)
    assert '"bas' in (out / "results.rejected.jsonl").read_text()
    assert (more.new_runs, more.skipped_runs) == (2, 4)
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(before) and len(after.splitlines()) == 6
    assert len(load_results(out / "results.jsonl")) == 6
    assert "| baseline | 3 |" in more.markdown

    # Finished runs from other code are still skipped, with a warning naming the option that reruns them.
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["env"]["code"] for r in recs} == {"c0de" * 4}
    recs[0]["env"]["code"] = "0" * 16
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    after = (out / "results.jsonl").read_bytes()
    with pytest.warns(RuntimeWarning, match="different canonreg code"):
        stale = run(grid_config(), out)
    assert stale.new_runs == 0 and stale.stale_runs == (recs[0]["run_id"],)

    # --no-resume keeps the old file aside and runs everything.
    fresh = run(grid_config(), out, resume=False)
    assert fresh.new_runs == 4 and (out / "results.jsonl.prev").read_bytes() == after
    # a second --no-resume keeps the first one's results too (it replaced them: finished runs were lost)
    newer = (out / "results.jsonl").read_bytes()
    run(grid_config(), out, resume=False)
    assert (out / "results.jsonl.prev").read_bytes() == after and (out / "results.jsonl.prev.2").read_bytes() == newer


def test_plots_are_written_for_numeric_factors(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (recipes/test extra)")
    cfg = grid_config(arm=["baseline", "noise"], noise=[0.5, 2.0], seed=[0, 1])
    cfg["ablation"]["metrics"] = ["mean_alpha"]
    res = run(cfg, tmp_path / "p")
    assert [p.name for p in res.plots] == ["mean_alpha_vs_noise.png"]
    png = res.plots[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    fig = ablate.plot_metric(list(res.records.values()), "mean_alpha", "noise")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["baseline (noise n/a)", "noise"]  # the baseline has no noise factor: a flat reference
    assert ax.get_xscale() == "linear"


def test_failed_runs_are_recorded_and_retried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = grid_config(lr=[0.05, 1e6])  # the second diverges
    cfg["grid"]["seed"] = [0]
    toml = tmp_path / "fail.toml"
    toml.write_text(_to_toml(cfg))
    out = tmp_path / "f"
    assert main([str(toml), "--out", str(out), "--workers", "0", "--no-progress", "--no-plots"]) == 1
    printed = capsys.readouterr().out
    assert "1 FAILED" in printed
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["config"]["lr"] == 1e6 and "Traceback" in errors[0]["traceback"]
    assert len(load_results(out / "results.jsonl")) == 1
    res = run(toml, out, plots=False)  # retried, fails again, the good run is skipped
    assert (res.new_runs, res.skipped_runs, len(res.failures)) == (0, 1, 1)


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_per_run_logs(kind: str, tmp_path: Path) -> None:
    if kind == "tensorboard":
        pytest.importorskip("tensorboard", reason="TensorBoard logs are optional: pip install 'canonreg[tensorboard]'")
    cfg = grid_config(arm=["noise"], seed=[0])
    cfg["fixed"]["noise"] = 0.5
    cfg["ablation"]["logs"] = kind
    res = run(cfg, tmp_path / "l", plots=False)
    (rid,) = res.records
    final_alpha = res.records[rid]["result"]["window_mean_alpha"]  # the logs follow the training-time monitor
    log_dir = tmp_path / "l" / "logs" / rid
    if kind == "csv":
        rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
        assert {r["run_id"] for r in rows} == {rid} and {int(r["step"]) for r in rows} == {6, 12}
        metrics = {r["metric"] for r in rows}
        assert {"alpha/f-RWA", "balance/noise_share", "monitor_balance/decay", "train_loss"} <= metrics
        final = [r for r in rows if r["step"] == "12" and r["metric"] == "mean_alpha"]
        assert float(final[0]["value"]) == final_alpha
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        events = acc.Scalars("mean_alpha")
        assert [e.step for e in events] == [6, 12]
        assert events[-1].value == pytest.approx(final_alpha, rel=1e-6)
        assert "balance/0/noise_share" in acc.Tags()["scalars"]


# ---------------------------------------------------------------------- determinism and backends
@pytest.fixture(scope="module")
def serial_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    cfg = grid_config(arm=["baseline", "both"], seed=[3])
    res = run(cfg, tmp_path_factory.mktemp("serial"), plots=False)
    return {rid: strip_timing(r["result"]) for rid, r in res.records.items()}


def test_same_config_same_numbers_in_worker_processes(serial_results: dict, tmp_path: Path) -> None:
    cfg = grid_config(arm=["baseline", "both"], seed=[3])
    res = run(cfg, tmp_path / "par", workers=2, plots=False)
    assert res.new_runs == 2
    par = {rid: strip_timing(r["result"]) for rid, r in res.records.items()}
    assert par == serial_results  # bit for bit, spawn workers vs in-process
    assert all(r["threads"] == 1 for r in par.values())


def test_ray_backend(serial_results: dict, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the Ray backend is optional: pip install 'canonreg[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = grid_config(arm=["baseline", "both"], seed=[3])
        res = run(cfg, tmp_path / "ray", workers=2, backend="ray", plots=False)
        assert (res.new_runs, res.failures) == (2, {})
        assert ray.is_initialized()  # a session the caller started is left running
    finally:
        ray.shutdown()
    assert {rid: strip_timing(r["result"]) for rid, r in res.records.items()} == serial_results


def test_ray_backend_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"canonreg\[ray\]"):
        run(grid_config(), tmp_path / "r", backend="ray", workers=2)
    assert not (tmp_path / "r").exists()


def test_cli_quick_run_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = grid_config(arm=["baseline", "loss"], seed=[0, 1, 2])
    cfg["ablation"]["out"] = str(tmp_path / "spec-out")
    cfg["quick"] = {"steps": 6, "eval_every": 3, "seed": [0]}
    toml = tmp_path / "a.toml"
    toml.write_text(_to_toml(cfg))
    assert main([str(toml), "--quick", "--workers", "0", "--no-progress", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| arm | runs | test_acc |" in printed and "2 runs: 2 run now, 0 already finished" in printed
    recs = load_results(tmp_path / "spec-out-quick" / "results.jsonl")
    assert {r["config"]["steps"] for r in recs.values()} == {6}
    from canonreg.cli import main as canonreg_main

    assert canonreg_main(["ablate", str(toml), "--quick", "--workers", "0", "--no-progress", "--no-plots"]) == 0
    assert "0 run now, 2 already finished" in capsys.readouterr().out


def test_cli_measure_flag_stores_the_measurement_and_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import _ablate_measure

    from canonreg.experiment import load_data, train_trial

    cfg = grid_config(arm=["baseline"], seed=[0])
    toml = tmp_path / "a.toml"
    toml.write_text(_to_toml(cfg))
    out = tmp_path / "out"
    flags = [str(toml), "--out", str(out), "--workers", "0", "--no-progress", "--no-plots", "--measure", MEASURE]
    assert main([*flags, "--measure-args", '{"scale": 3.0, "rows": 2}']) == 0
    (rec,) = load_results(out / "results.jsonl").values()
    assert rec["measure_call"] == {"function": MEASURE, "args": {"scale": 3.0, "rows": 2}}
    trial = next(iter(run(cfg, out, plots=False, measure=MEASURE, measure_args={"scale": 3.0, "rows": 2}).configs))
    want = _ablate_measure.weights_and_accuracy(train_trial(trial), load_data(trial), scale=3.0, rows=2)
    assert rec["measure"]["sq_weights"] == want["sq_weights"] and len(rec["measure"]["pred"]) == 2
    capsys.readouterr()
    for bad, named in (("[1, 2]", "`--measure-args` to be a JSON object"), ("{scale: 1}", "`--measure-args` to be a JSON object")):
        assert main([*flags, "--measure-args", bad]) == 2
        assert named in capsys.readouterr().err
    assert main([str(toml), "--out", str(tmp_path / "none"), "--measure", "no_such_module_xyz:f"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err and not (tmp_path / "none").exists()


def _to_toml(cfg: dict[str, Any]) -> str:
    """Minimal TOML writer for the test configs (tables of scalars and lists)."""

    def val(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    out = []
    for table, body in cfg.items():
        out.append(f"[{table}]")
        out += [f"{k} = {val(v)}" for k, v in body.items()]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------- a measurement of every trained model
MEASURE = "_ablate_measure:weights_and_accuracy"  # tests/_ablate_measure.py; tests/ is on sys.path (workers inherit it)


def test_measure_runs_in_the_workers_is_stored_and_kept_on_resume(tmp_path: Path) -> None:
    import _ablate_measure

    from canonreg.experiment import load_data, train_trial

    cfg = grid_config(arm=["baseline", "loss"], seed=[1])
    res = run(cfg, tmp_path, workers=2, plots=False, measure=MEASURE, measure_args={"scale": 2.0, "rows": 5})
    assert res.new_runs == 2 and not res.failures
    for trial in res.configs:
        rec = res.records[config_id(trial)]
        assert rec["measure_call"] == {"function": MEASURE, "args": {"scale": 2.0, "rows": 5}}
        assert "measure" not in rec["result"]
        # reference: the same trial trained here, in this process, and measured directly
        ref = _ablate_measure.weights_and_accuracy(train_trial(trial), load_data(trial), scale=2.0, rows=5)
        m = rec["measure"]
        assert m["sq_weights"] == ref["sq_weights"] and m["pred"] == ref["pred"].tolist() and len(m["pred"]) == 5
        assert (m["arm"], m["seed"], m["n_train"]) == (trial.arm, 1, load_data(trial).x.shape[0])
        assert m["test_acc"] == rec["result"]["test_acc"]  # the run's own evaluation of the same model
        assert m["undefined"] is None  # NaN stored as JSON null
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert {json.loads(line)["run_id"]: json.loads(line)["measure"] for line in lines} == {rid: r["measure"] for rid, r in res.records.items()}
    # resume: the same call recomputes nothing and returns the stored records
    again = run(cfg, tmp_path, plots=False, measure=MEASURE, measure_args={"scale": 2.0, "rows": 5})
    assert again.new_runs == 0 and again.skipped_runs == 2 and again.records == res.records
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    # another call (other args) runs again; a run without a measurement accepts any record
    other = run(cfg, tmp_path, plots=False, measure=MEASURE, measure_args={"scale": 1.0, "rows": 5})
    assert other.new_runs == 2
    for rid, rec in other.records.items():
        assert rec["measure"]["sq_weights"] == pytest.approx(res.records[rid]["measure"]["sq_weights"] / 2, rel=1e-15)
    # one line per run in results.jsonl (a line-by-line reader would count a recomputed run twice); the older
    # records are kept in results.superseded.jsonl
    now = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run_id"] for r in now) == sorted(other.records) and all(r["measure_call"]["args"]["scale"] == 1.0 for r in now)
    assert (tmp_path / "results.superseded.jsonl").read_text().splitlines() == lines
    assert run(cfg, tmp_path, plots=False).new_runs == 0


@pytest.mark.parametrize(
    "measure, measure_args, named",
    [
        ("_ablate_measure.weights_and_accuracy", None, "'package.module:function'"),
        ("_ablate_measure:weights:x", None, "'package.module:function'"),
        ("no_such_module_xyz:f", None, "no_such_module_xyz"),
        ("_ablate_measure:no_such_function", None, "no attribute 'no_such_function'"),
        ("canonreg.ablate:DEFAULT_METRICS", None, "callable"),
        (42, None, "`measure`"),
        (MEASURE, {"scale": float("nan")}, "`measure_args`"),
        (MEASURE, {"scale": object()}, "`measure_args`"),
        (MEASURE, [1], "`measure_args`"),
        (None, {"scale": 1.0}, "`measure_args` only together with `measure`"),
    ],
)
def test_bad_measure_is_rejected_before_anything_runs(measure: Any, measure_args: Any, named: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="measure") as info:
        run(grid_config(), tmp_path / "out", measure=measure, measure_args=measure_args)
    assert named in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "function, message",
    [
        ("fails", "measure '_ablate_measure:fails' raised ZeroDivisionError: division by zero"),
        ("not_a_dict", "Expected measure '_ablate_measure:not_a_dict' to return a dict, but got list"),
        ("not_json", "Expected measure '_ablate_measure:not_json' to return a JSON-able dict"),
    ],
)
def test_failing_measure_fails_its_run_like_a_run_error(function: str, message: str, tmp_path: Path) -> None:
    cfg = grid_config(arm=["baseline"], seed=[0])
    res = run(cfg, tmp_path, plots=False, measure=f"_ablate_measure:{function}")
    rid = config_id(res.configs[0])
    assert res.new_runs == 0 and list(res.failures) == [rid] and res.records == {}
    assert res.failures[rid].startswith("MeasureError: " + message)
    (err,) = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert err["run_id"] == rid and message in err["error"] and "Traceback" in err["traceback"]
    assert not (tmp_path / "results.jsonl").exists() or (tmp_path / "results.jsonl").read_text() == ""


# ---------------------------------------------------------------------- the package
def test_package_keeps_every_public_name_and_module_entry() -> None:
    # canonreg.ablate became a package (spec, runner, store, tables, plots, cli): the old names import from it,
    # the statistics are canonreg.stats' own, and `python -m canonreg.ablate` is `canonreg ablate`.
    import subprocess

    from canonreg import stats

    names = {"PlotSpec", "AblationSpec", "AblationResult", "Interval", "load_spec", "run_ablation", "load_results", "summarize",
             "write_summaries", "summary_markdown", "summary_csv", "plot_metric", "mean_ci", "t_quantile", "code_fingerprint",
             "Terminated", "main", "TIMING_KEYS"}  # fmt: skip
    assert names <= set(ablate.__all__) and all(hasattr(ablate, n) for n in ablate.__all__)
    assert ablate.mean_ci is stats.mean_ci and ablate.Interval is stats.Interval and ablate.code_fingerprint is stats.code_fingerprint
    out = subprocess.run([sys.executable, "-m", "canonreg.ablate", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: canonreg ablate"), out.stderr


def test_per_layer_metrics_of_the_grids_models_are_accepted() -> None:
    cfg = grid_config()
    cfg["ablation"]["metrics"] = ["alpha@0", "erank@2", "pcs95@2", "test_acc"]
    assert ablate.load_spec(cfg).metrics == ("alpha@0", "erank@2", "pcs95@2", "test_acc")
