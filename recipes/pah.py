"""PAH recipe: measured power-law exponents per layer, read against the phase table of theory §4.

The Polynomial Alignment Hypothesis (Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006): when the
Canonical Representation Hypothesis breaks, the six matrices of a layer ``h_b = W h_a`` become powers
of one another. With ``W = U S Vᵀ``, ``z = s²``, the exact identities ``H_b = W H_a Wᵀ`` and
``G_a = Wᵀ G_b W`` (theory §1) give, in the singular bases, when ``H_a ↔ z^p`` and ``G_b ↔ z^q``:

    H_a ↔ z^p,   G_b ↔ z^q,   H_b ↔ z^(p+1),   G_a ↔ z^(q+1),   Z_a, Z_b ↔ z.

A relation ``A ∝ B`` that holds is the linear constraint ``power(A) = power(B)`` on ``(p, q)``:

    f-RGA: p − q = 1    f-GWA: q = 0    f-RWA: p = 1
    b-RGA: q − p = 1    b-GWA: q = 1    b-RWA: p = 0

(:func:`predict_exponents`). One forward and one backward relation of different kinds fix ``(p, q)``
and with it every PAH exponent ``κ_r = power(A_r) / power(B_r)`` of ``A_r ∝ B_r^κ_r`` — theory §4's
table, exponents in ``[−1, 3]``. Inconsistent constraints (the same kind on both sides, or two kinds
on one side plus a third relation) leave only a flat nonzero spectrum of ``Z``: full CRH, "compact".
A single constraint fixes only some exponents (``f-RWA`` alone gives ``H_b ∝ Z_b²`` exactly); no
relation, no prediction. ``power(B) = 0`` means ``B ∝ I`` on the support: ``κ`` is undefined.

The measurement. For each setting (depth, weight decay γ), arm and seed an MLP on MNIST-1D is
trained by :func:`canonreg.experiment.train_trial` (one loop for every recipe and ablation; one
:func:`canonreg.ablate.run_ablation` grid of arms × seeds per setting, ``--workers`` processes,
resumable in ``--out``/``runs/<setting>``, :func:`measure_run` measuring each trained model in its
worker), whose :class:`~canonreg.CRHMonitor` measures over the last ``window`` SGD steps only; moments are
``centered`` by default, because the identities above — and so the table — are exact for centred
(or raw) moments and are broken by the per-sample normalisation of the paper's protocol. Per layer:

* the phase = relations whose α (Pearson, mean over seeds) is ``>= threshold``;
* measured ``κ_r`` per seed (``report.exponents``: eigendecompose ``B = VΛVᵀ``, fit
  ``log vᵢᵀAvᵢ = κ log λᵢ + c`` over eigenvalues above ``floor · λ_max``, bootstrap interval), summarised
  as the mean over seeds with a 95% Student-t interval ``t_{0.975, n−1} · sd/√n`` (one seed: its
  bootstrap interval). The floor decides what the fit sees: ``1e-3`` (reported in full) keeps the
  trained top of the spectrum; ``1e-6`` (the monitor's default, summarised) also keeps the residue of
  the random initialisation that weight decay has not removed yet (``e^{−2ηγT}`` of its size);
* the verdict: "consistent" when every determined prediction lies in its measured interval,
  "not consistent" (naming the relations) otherwise, "no prediction" when no exponent is determined.
  For the compact phase the prediction is a flat nonzero ``Z`` spectrum: we report the participation
  ratio ``(Σλ)²/Σλ²`` of ``Z_b`` divided by the number of its eigenvalues above 1% of the largest
  (1 = flat) and call it consistent when it is ``>= 0.5``.

Settings (``name:depth:γ``): ``strong-decay:4:1e-2`` (where CRH should form) and
``weak-decay-deep:6:1e-4`` (where it should break: weak decay, deeper net). Four arms
(:mod:`canonreg.experiment`), three seeds. Run::

    python recipes/pah.py --quick --out /tmp/pah     # CI setting, < 1 minute
    python recipes/pah.py                              # full (results/pah)

Outputs in ``--out``: ``results.md``, ``results.json`` (resolved config, environment, per-run fits,
predictions and verdicts), ``eigen_scatter.png`` (eigen-scatter of every relation of one layer per
setting, with the fitted and the predicted slope), ``kappa_measured_vs_predicted.png`` and ``runs/``
(the runner's records; ``runs/<setting>/reports/``: the first seed's window report of every arm,
trimmed to the scatter layer, for the figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from _common import ARM_COLORS, STUDY_ARMS, check_arms, check_seeds, config_from_args, markdown_table, nan_for_none, recipe_parser

from canonreg import RELATION_PAIRS, RELATIONS, CRHReport
from canonreg.ablate import run_ablation
from canonreg.data import Split
from canonreg.experiment import ARMS, TrainedTrial, TrialConfig, config_id
from canonreg.functional import power_law_fit
from canonreg.optim import effective_lr
from canonreg.stats import environment, fmt_ci, mean_ci, write_json


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Setting:
    """One architecture × weight-decay setting, written ``name:depth:weight_decay`` on the command line."""

    name: str
    depth: int
    weight_decay: float

    @classmethod
    def parse(cls, text: str) -> Setting:
        parts = text.split(":")
        try:
            name, depth, wd = parts
            s = cls(name, int(depth), float(wd))
        except ValueError:
            raise ValueError(f"Expected a setting 'name:depth:weight_decay' (e.g. 'weak:6:1e-4'), but got {text!r}") from None
        if s.depth < 2 or s.weight_decay < 0 or not name:
            raise ValueError(f"Expected depth >= 2 and weight_decay >= 0 in setting {text!r}")
        return s


@dataclass(frozen=True)
class Config:
    """The study: settings × arms × seeds, MLP on MNIST-1D, plain SGD (η = lr)."""

    settings: tuple[str, ...] = ("strong-decay:4:1e-2", "weak-decay-deep:6:1e-4")
    arms: tuple[str, ...] = STUDY_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 5000
    data_seed: int = 42
    width: int = 128
    lr: float = 0.2
    momentum: float = 0.0
    batch_size: int = 128
    steps: int = 1500
    window: int = 100
    noise: float | str = "auto"
    loss_weight: float = 0.1
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    preprocess: str = "centered"
    metric: str = "pearson"
    threshold: float = 0.9  # α at or above which a relation "holds" (CRHReport.phase's default)
    eig_floors: tuple[float, ...] = (1e-3, 1e-6)  # PAH fits use eigenvalues above floor · λ_max; the first is reported in full
    n_bootstrap: int = 200
    scatter_layer: str = "2"  # the layer whose eigen-scatter is plotted
    workers: int = 2  # runner processes (0 = in this process; each run trains with one thread, the numbers do not depend on it)
    resume: bool = True  # keep finished runs of out/runs
    out: str = "results/pah"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if not self.settings:
            raise ValueError("Expected at least one entry in `settings`, but got none")
        names = [Setting.parse(s).name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct setting names, but got {names}")
        if not self.eig_floors or any(not 0 <= f < 1 for f in self.eig_floors):
            raise ValueError(f"Expected `eig_floors` to be floats in [0, 1), but got {list(self.eig_floors)!r}")
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"Expected `threshold` in [-1, 1], but got {self.threshold!r}")
        if not 1 <= self.window <= self.steps:
            raise ValueError(f"Expected `window` in [1, steps={self.steps}], but got {self.window!r}")
        if self.workers < 0:
            raise ValueError(f"Expected `workers` to be a non-negative int, but got {self.workers!r}")

    def trial_fields(self, setting: Setting) -> dict[str, Any]:
        """The :class:`TrialConfig` fields every arm and seed of ``setting`` shares."""
        return dict(
            dataset="mnist1d", num_samples=self.num_samples, data_seed=self.data_seed, model="mlp",
            width=self.width, depth=setting.depth, optimizer="sgd", lr=self.lr, momentum=self.momentum,
            weight_decay=setting.weight_decay, noise=self.noise, loss_weight=self.loss_weight,
            relations=self.relations, batch_size=self.batch_size, steps=self.steps,
            preprocess=self.preprocess, metric=self.metric, eval_every=self.window, monitor_windows="last",
            n_bootstrap=self.n_bootstrap,
        )  # fmt: skip

    def trial(self, setting: Setting, arm: str, seed: int) -> TrialConfig:
        return TrialConfig(arm=arm, seed=seed, **self.trial_fields(setting)).resolved()

    def spec(self, setting: Setting) -> dict[str, Any]:
        """The :func:`canonreg.ablate.run_ablation` grid of ``setting``: every arm × seed (arm-major)."""
        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in self.trial_fields(setting).items()}
        grid = {"arm": list(self.arms), "seed": list(self.seeds)}
        return {"ablation": {"name": f"pah-{setting.name}", "workers": self.workers}, "fixed": fixed, "grid": grid}


#: ``--quick``: the CI setting (< 1 minute).
QUICK: dict[str, Any] = {"settings": ("strong-decay:3:1e-2", "weak-decay:3:1e-4"), "seeds": (0, 1), "width": 32, "steps": 80, "window": 20, "n_bootstrap": 50}


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = recipe_parser(__doc__, arms=ARMS)
    p.add_argument("--settings", nargs="+", help="name:depth:weight_decay ...")
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--preprocess", choices=("raw", "centered", "normalized"))
    p.add_argument("--eig-floors", nargs="+", type=float)
    p.add_argument("--n-bootstrap", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction)
    return config_from_args(Config, p, argv, QUICK)


# ---------------------------------------------------------------------- the phase table (theory §4)
#: Power of ``z`` of each matrix as ``(coefficient of p, coefficient of q, constant)``.
POWERS: dict[str, tuple[int, int, int]] = {
    "H_a": (1, 0, 0),
    "G_b": (0, 1, 0),
    "H_b": (1, 0, 1),
    "G_a": (0, 1, 1),
    "Z_a": (0, 0, 1),
    "Z_b": (0, 0, 1),
}

#: Z-flatness (compact phase) = participation ratio of Z_b / number of eigenvalues >= FLAT_FLOOR · λ_max.
FLAT_FLOOR = 1e-2

PhaseKind = Literal["power law", "partial", "compact", "none"]


@dataclass(frozen=True)
class Prediction:
    """What the holding relations predict for one layer.

    Attributes:
        holding: the relations taken to hold.
        kind: ``"power law"`` (``p, q`` fixed), ``"partial"`` (one constraint: some exponents fixed),
            ``"compact"`` (inconsistent constraints: flat Z spectrum, full CRH) or ``"none"``.
        p, q: the powers of ``H_a`` and ``G_b`` (NaN unless fixed).
        kappa: ``relation → κ`` for every determined exponent (NaN when ``B ∝ I`` makes it undefined);
            relations whose exponent is not determined are absent.
    """

    holding: tuple[str, ...]
    kind: PhaseKind
    p: float
    q: float
    kappa: dict[str, float]


def predict_exponents(holding: Iterable[str], tol: float = 1e-9) -> Prediction:
    """Exponents ``κ_r`` of ``A_r ∝ B_r^κ_r`` implied by the relations in ``holding`` (theory §4).

    Each holding relation ``A ∝ B`` adds the row ``power(A) − power(B)`` to a linear system in
    ``x = (p, q)``; see the module docstring. Its solutions form ``x(t) = x₀ + t d`` (``d = 0`` when two
    independent relations fix ``(p, q)``; ``d`` spans the null space when one does). An exponent
    ``κ_r(t) = power(A_r)(x(t)) / power(B_r)(x(t))`` is *determined* when it does not depend on ``t``;
    it is NaN (undefined) when ``power(B_r) ≡ 0``, i.e. ``B_r ∝ I`` on the support of ``Z``.

    Example:
        >>> predict_exponents(["f-RWA", "b-GWA"]).kappa["b-RWA"]   # H_b ∝ Z_b²
        2.0
    """
    hold = tuple(r for r in RELATIONS if r in set(holding))
    unknown = set(holding) - set(RELATIONS)
    if unknown:
        raise ValueError(f"Expected `holding` to contain names from {list(RELATIONS)}, but got {sorted(unknown)}")
    nan = math.nan
    if not hold:
        return Prediction(hold, "none", nan, nan, {})
    rows = np.array([np.subtract(POWERS[RELATION_PAIRS[r][0]], POWERS[RELATION_PAIRS[r][1]]) for r in hold], dtype=np.float64)
    m, c = rows[:, :2], -rows[:, 2]
    x0, *_ = np.linalg.lstsq(m, c, rcond=None)
    if float(np.abs(m @ x0 - c).max()) > 1e-7:
        return Prediction(hold, "compact", nan, nan, {})
    rank = int(np.linalg.matrix_rank(m, tol=tol))
    d = np.zeros(2) if rank == 2 else np.linalg.svd(m)[2][-1]  # null direction of the constraints

    def line(f: tuple[int, int, int]) -> tuple[float, float]:
        """``power(x(t)) = a + b t``."""
        coef = np.asarray(f[:2], dtype=np.float64)
        return float(coef @ x0 + f[2]), float(coef @ d)

    def clean(v: float) -> float:
        r = float(round(v))
        return (r if abs(v - r) < 1e-9 else v) + 0.0  # integers exact, no −0.0

    kappa: dict[str, float] = {}
    for r, (a_name, b_name) in RELATION_PAIRS.items():
        (n0, n1), (d0, d1) = line(POWERS[a_name]), line(POWERS[b_name])
        if abs(d0) <= tol and abs(d1) <= tol:
            if abs(n1) <= tol:  # B ∝ I while A's power is fixed: the exponent is undefined
                kappa[r] = nan
            continue
        if abs(n0 * d1 - n1 * d0) > tol:  # the ratio changes along the solution line
            continue
        kappa[r] = clean(n1 / d1 if abs(d1) > tol else n0 / d0)
    p0, p1 = line(POWERS["H_a"])
    q0, q1 = line(POWERS["G_b"])
    p = clean(p0) if abs(p1) <= tol else nan
    q = clean(q0) if abs(q1) <= tol else nan
    return Prediction(hold, "power law" if rank == 2 else "partial", p, q, kappa)


# ---------------------------------------------------------------------- what one trained run gives
def measure(trained: TrainedTrial, x_test: torch.Tensor, y_test: torch.Tensor, eig_floors: Sequence[float]) -> dict[str, Any]:
    """Test accuracy, the window's α, its PAH fits at every floor and the Z-flatness of every layer.

    The fits are :func:`canonreg.functional.power_law_fit` on the window report's matrices with one
    generator seeded from the trial's seed, in the monitor's own order, so they equal
    ``monitor.compute(floor=floor, n_bootstrap=n, bootstrap_seed=seed)``'s. ``report`` keeps the report
    with the first floor's fits (for the eigen-scatter).
    """
    cfg, report = trained.config, trained.report
    by_floor = {}
    for floor in eig_floors:
        gen = torch.Generator().manual_seed(cfg.seed)
        by_floor[floor] = {
            layer: {rel: power_law_fit(report.matrices(layer)[a], report.matrices(layer)[b], floor=floor, n_bootstrap=cfg.n_bootstrap, generator=gen)
                    for rel, (a, b) in RELATION_PAIRS.items()}
            for layer in report.layers
        }  # fmt: skip
    flat = {}
    for layer in report.layers:
        lam = torch.linalg.eigvalsh(report.matrices(layer)["Z_b"]).clamp_min(0)
        kept = lam[lam >= FLAT_FLOOR * lam.max()]
        flat[layer] = float(kept.sum() ** 2 / (kept**2).sum() / kept.numel())
    with torch.no_grad():
        test_acc = float((trained.model(x_test).argmax(1) == y_test).double().mean())
    return {
        "test_acc": test_acc,
        "alpha": report.alignment,
        "exponents": {f"{floor:g}": {layer: {r: f.to_dict() for r, f in fits.items()} for layer, fits in by.items()} for floor, by in by_floor.items()},
        "z_flatness": flat,
        "report": dataclasses.replace(report, exponents=by_floor[eig_floors[0]]),
    }


def measure_run(
    trained: TrainedTrial, split: Split, eig_floors: Sequence[float], scatter_layer: str, report_seed: int, report_dir: str
) -> dict[str, Any]:
    """The runner's measurement of one trained run, in its worker: :func:`measure` on the test split;
    for the seed ``report_seed`` the window report (first floor's fits, only the plotted layer's
    matrices) is saved to ``report_dir`` for the eigen-scatter, its path under ``"report_file"``."""
    got = measure(trained, split.x_test, split.y_test, tuple(eig_floors))
    report: CRHReport = got.pop("report")
    got["report_file"] = None
    if trained.config.seed == report_seed:
        layer = _scatter_layer(report, scatter_layer)
        path = Path(report_dir) / f"{trained.config.arm}-seed{report_seed}-{config_id(trained.config)}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dataclasses.replace(report, _matrices={layer: report.matrices(layer)}), path)
        got["report_file"] = str(path)
    return got


def _scatter_layer(report: CRHReport, wanted: str) -> str:
    """``wanted`` if the report has it, else its middle layer."""
    return wanted if wanted in report.layers else report.layers[len(report.layers) // 2]


# ---------------------------------------------------------------------- reading the table
@dataclass(frozen=True)
class Measured:
    """Seed summary of one exponent: mean κ with a 95% interval, mean R² and off-diagonal mass."""

    kappa: float
    ci_low: float
    ci_high: float
    r2: float
    off_diagonal: float
    n: int


def summarize_kappa(fits: Sequence[Mapping[str, Any]]) -> Measured:
    """Mean over seeds of the fitted κ with a Student-t 95% interval (one seed: its bootstrap interval)."""
    ks = [f["exponent"] for f in fits if f["exponent"] is not None and math.isfinite(f["exponent"])]
    good = [f for f in fits if f["exponent"] is not None and math.isfinite(f["exponent"])]
    r2 = float(np.mean([f["r2"] for f in good])) if good else math.nan
    off = float(np.mean([f["off_diagonal"] for f in good])) if good else math.nan
    if not ks:
        return Measured(math.nan, math.nan, math.nan, r2, off, 0)
    if len(ks) == 1:
        f = good[0]
        lo = f["ci_low"] if f["ci_low"] is not None else math.nan
        hi = f["ci_high"] if f["ci_high"] is not None else math.nan
        return Measured(float(ks[0]), float(lo), float(hi), r2, off, 1)
    iv = mean_ci(ks)
    return Measured(iv.mean, iv.low, iv.high, r2, off, len(ks))


def layer_verdict(pred: Prediction, measured: Mapping[str, Measured], flatness: float) -> tuple[str, list[str]]:
    """``(verdict, failing relations)`` of one layer (see the module docstring)."""
    if pred.kind == "compact":
        return ("consistent" if flatness >= 0.5 else "not consistent", [] if flatness >= 0.5 else ["Z not flat"])
    checked = {r: k for r, k in pred.kappa.items() if math.isfinite(k)}
    if not checked:
        return "no prediction", []
    bad = [r for r, k in checked.items() if not (measured[r].ci_low <= k <= measured[r].ci_high)]
    return ("consistent" if not bad else "not consistent"), bad


def analyse(cfg: Config, records: Sequence[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
    """One row per (setting, arm, layer): phase, prediction, exponents measured at ``floor``, verdict."""
    rows = []
    for setting in (Setting.parse(s) for s in cfg.settings):
        for arm in cfg.arms:
            recs = [r for r in records if r["setting"] == setting.name and r["arm"] == arm]
            for layer in recs[0]["alpha"] if recs else ():
                alpha = {rel: float(np.nanmean([np.nan if r["alpha"][layer][rel] is None else r["alpha"][layer][rel] for r in recs])) for rel in RELATIONS}
                holding = [rel for rel in RELATIONS if alpha[rel] >= cfg.threshold]
                pred = predict_exponents(holding)
                measured = {rel: summarize_kappa([r["exponents"][f"{floor:g}"][layer][rel] for r in recs]) for rel in RELATIONS}
                flat = float(np.mean([r["z_flatness"][layer] for r in recs]))
                verdict, bad = layer_verdict(pred, measured, flat)
                rows.append({
                    "setting": setting.name, "arm": arm, "layer": layer, "floor": floor, "alpha": alpha, "prediction": pred,
                    "measured": measured, "z_flatness": flat, "verdict": verdict, "failing": bad,
                })  # fmt: skip
    return rows


# ---------------------------------------------------------------------- the study
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = [Setting.parse(s) for s in cfg.settings]

    # One ablation grid per setting: every (arm, seed) trained by canonreg.experiment's loop (same data,
    # initialisation and batch order per seed in every arm; the monitor on the last `window` steps), then
    # measure_run on the trained model in its worker.
    plot_arms = {cfg.arms[0], cfg.arms[-1]}
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    reports: dict[tuple[str, str], CRHReport] = {}
    for s in settings:
        runs_dir = out / "runs" / s.name
        done = run_ablation(
            cfg.spec(s), out=runs_dir, resume=cfg.resume, progress=False, plots=False, measure="pah:measure_run",
            measure_args={"eig_floors": list(cfg.eig_floors), "scatter_layer": cfg.scatter_layer,
                          "report_seed": cfg.seeds[0], "report_dir": str(runs_dir / "reports")},
        )  # fmt: skip
        for trial in done.configs:
            rid = config_id(trial)
            run: dict[str, Any] = {"setting": s.name, "arm": trial.arm, "seed": trial.seed, "config": trial.to_dict()}
            if rid not in done.records:  # a dead layer (α undefined in the loss) or divergence
                runs.append(run | {"failed": done.failures.get(rid, "not finished")})
                print(f"  {s.name:<16} {trial.arm:<8} seed={trial.seed}  FAILED: {runs[-1]['failed'][:120]}", flush=True)
                continue
            got = nan_for_none(done.records[rid]["measure"])
            report_file = got.pop("report_file")
            if trial.seed == cfg.seeds[0] and trial.arm in plot_arms:
                reports[(s.name, trial.arm)] = torch.load(report_file, weights_only=False)
            runs.append(run | got | {"seconds": done.records[rid]["result"]["train_time_s"]})
            print(f"  {s.name:<16} {trial.arm:<8} seed={trial.seed}  acc={got['test_acc']:.3f}  ({runs[-1]['seconds']:.1f}s)", flush=True)
    wall = time.perf_counter() - t0
    records = [r for r in runs if "failed" not in r]
    failures = [r for r in runs if "failed" in r]

    # Phase, prediction and measured exponents per (setting, arm, layer), at every floor.
    by_floor = {floor: analyse(cfg, records, floor) for floor in cfg.eig_floors}
    rows = by_floor[cfg.eig_floors[0]]

    md = report_markdown(cfg, records, failures, by_floor, wall)
    (out / "results.md").write_text(md)
    print(md)
    summary = {
        "config": dataclasses.asdict(cfg),
        "environment": environment(),
        "wall_time_s": wall,
        "runs": runs,
        "layers": [
            row | {"prediction": dataclasses.asdict(row["prediction"]), "measured": {k: dataclasses.asdict(v) for k, v in row["measured"].items()}}
            for floor_rows in by_floor.values()
            for row in floor_rows
        ],
    }
    write_json(out / "results.json", summary)
    plot(cfg, settings, reports, rows, out)
    return summary


# ---------------------------------------------------------------------- tables and figures

def _kfmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.2f}"


def _pred_text(k: float | None) -> str:
    if k is None:
        return "–"
    return "undef (B∝I)" if math.isnan(k) else f"{k:.2f}".rstrip("0").rstrip(".")


def report_markdown(
    cfg: Config,
    records: Sequence[dict[str, Any]],
    failures: Sequence[dict[str, Any]],
    by_floor: Mapping[float, Sequence[dict[str, Any]]],
    wall: float,
) -> str:
    """The tables of ``results.md``: a summary per eigenvalue floor, then the first floor in full."""
    floor0 = cfg.eig_floors[0]
    rows = by_floor[floor0]
    lines = [
        "# PAH: exponents per layer against the phase table (theory §4)",
        "",
        f"MLP width {cfg.width} on MNIST-1D, SGD η = {effective_lr({'lr': cfg.lr, 'momentum': cfg.momentum}):g} (momentum {cfg.momentum:g}), batch "
        f"{cfg.batch_size}, {cfg.steps} steps; {cfg.preprocess} moments over the last {cfg.window} steps; "
        f"α = {cfg.metric}; a relation holds when the seed-mean α >= {cfg.threshold}; seeds {list(cfg.seeds)}; "
        f"arms {list(cfg.arms)}. Wall time {wall:.0f} s ({cfg.workers} runner worker(s)).",
        "",
        "Measured κ: mean over seeds [95% t-interval] of the fit over eigenvalues above floor · λ_max; predicted κ in",
        "parentheses (– not determined by the phase, undef: B ∝ I). ✓/✗: prediction inside/outside the interval.",
        "",
        "## Summary: layers whose measured exponents agree with the phase table",
        "",
    ]
    summ = []
    for floor, name, arm in ((f, Setting.parse(s).name, a) for f in by_floor for s in cfg.settings for a in cfg.arms):
        rs = [r for r in by_floor[floor] if r["setting"] == name and r["arm"] == arm]
        acc_text = fmt_ci([r["test_acc"] for r in records if r["setting"] == name and r["arm"] == arm])
        kinds = ", ".join(f"{r['layer']}:{r['prediction'].kind}" for r in rs)
        n_pred = sum(r["verdict"] != "no prediction" for r in rs)
        n_ok = sum(r["verdict"] == "consistent" for r in rs)
        checks = [
            (k, r["measured"][rel])
            for r in rs
            if r["prediction"].kind != "compact"
            for rel, k in r["prediction"].kappa.items()
            if math.isfinite(k)
        ]
        inside = sum(m.ci_low <= k <= m.ci_high for k, m in checks)
        held = [r["measured"][rel] for r in rs for rel in r["prediction"].holding]
        unit = sum(m.ci_low <= 1.0 <= m.ci_high for m in held)
        summ.append([f"{floor:g}", name, arm, acc_text, kinds, f"{n_ok}/{n_pred}", f"{inside}/{len(checks)}", f"{unit}/{len(held)}"])
    lines += [markdown_table(["floor", "setting", "arm", "test acc", "phase kind per layer", "layers consistent / with a prediction", "exponents inside CI / predicted", "held relations with κ CI ∋ 1"], summ), ""]

    for s in cfg.settings:
        name = Setting.parse(s).name
        lines += [f"## {name} (depth {Setting.parse(s).depth}, γ = {Setting.parse(s).weight_decay:g}); floor {floor0:g}", ""]
        for arm in cfg.arms:
            rs = [r for r in rows if r["setting"] == name and r["arm"] == arm]
            table = []
            for r in rs:
                pred: Prediction = r["prediction"]
                cells = []
                for rel in RELATIONS:
                    m: Measured = r["measured"][rel]
                    k = pred.kappa.get(rel)
                    mark = "" if k is None or math.isnan(k) or pred.kind == "compact" else (" ✓" if m.ci_low <= k <= m.ci_high else " ✗")
                    cells.append(f"{_kfmt(m.kappa)} [{_kfmt(m.ci_low)}, {_kfmt(m.ci_high)}] ({_pred_text(k)}){mark}")
                phase = ", ".join(pred.holding) or "∅"
                pq = "" if pred.kind not in ("power law", "partial") else f" p={_kfmt(pred.p)} q={_kfmt(pred.q)}"
                verdict = r["verdict"] + (f" ({', '.join(r['failing'])})" if r["failing"] else "")
                if pred.kind == "compact":
                    verdict += f"; Z flatness {r['z_flatness']:.2f}"
                table.append([r["layer"], phase, pred.kind + pq, *cells, verdict])
            lines += [f"**{arm}**", "", markdown_table(["layer", "phase (α ≥ thr)", "kind", *RELATIONS, "verdict"], table), ""]
        alpha_rows = []
        for arm in cfg.arms:
            for r in (r for r in rows if r["setting"] == name and r["arm"] == arm):
                alpha_rows.append([arm, r["layer"], *(f"{r['alpha'][rel]:.2f}" for rel in RELATIONS)])
        lines += ["α (mean over seeds)", "", markdown_table(["arm", "layer", *RELATIONS], alpha_rows), ""]
    if failures:
        lines += ["## Runs that failed (left out of every table above)", ""]
        lines += [markdown_table(["setting", "arm", "seed", "reason"], [[r["setting"], r["arm"], str(r["seed"]), r["failed"][:200]] for r in failures]), ""]
    return "\n".join(lines)


def plot(cfg: Config, settings: Sequence[Setting], reports: Mapping[tuple[str, str], CRHReport], rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``eigen_scatter.png`` and ``kappa_measured_vs_predicted.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from canonreg.plotting import plot_pair

    keys = [k for k in ((s.name, a) for s in settings for a in cfg.arms) if k in reports]
    fig, axes = plt.subplots(len(keys), len(RELATIONS), figsize=(4 * len(RELATIONS), 3.6 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        rep = reports[key]
        layer = _scatter_layer(rep, cfg.scatter_layer)
        row = next(r for r in rows if (r["setting"], r["arm"], r["layer"]) == (*key, layer))
        for j, rel in enumerate(RELATIONS):
            ax = axes[i, j]
            plot_pair(rep, layer, rel, ax, floor=cfg.eig_floors[0])
            k = row["prediction"].kappa.get(rel)
            fit = rep.exponents[layer][rel]
            if k is not None and math.isfinite(k) and math.isfinite(fit.exponent):
                x0, x1 = ax.get_xlim()
                xm = 0.5 * (x0 + x1)
                ym = fit.exponent * xm + fit.intercept / math.log(10)
                ax.plot([x0, x1], [ym + k * (x0 - xm), ym + k * (x1 - xm)], "k--", lw=1, label=f"predicted κ = {_pred_text(k)}")
                ax.set_xlim(x0, x1)
                ax.legend(fontsize=7)
            ax.set_title(f"{key[0]} / {key[1]} / layer {layer}\n{rel} (α = {rep.alignment[layer][rel]:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "eigen_scatter.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5.5))
    markers = {s.name: m for s, m in zip(settings, "osD^v")}
    for r in rows:
        if r["prediction"].kind == "compact":
            continue
        for rel, k in r["prediction"].kappa.items():
            m: Measured = r["measured"][rel]
            if not (math.isfinite(k) and math.isfinite(m.kappa)):
                continue
            lo = m.kappa - m.ci_low if math.isfinite(m.ci_low) else 0.0
            hi = m.ci_high - m.kappa if math.isfinite(m.ci_high) else 0.0
            jitter = 0.04 * (ARMS.index(r["arm"]) - 1.5)
            ax.errorbar(k + jitter, m.kappa, yerr=[[lo], [hi]], fmt=markers[r["setting"]], color=ARM_COLORS.get(r["arm"]), ms=4, capsize=2, alpha=0.8)
    lim = [-1.5, 3.5]
    ax.plot(lim, lim, "k:", lw=1)
    ax.set_xlim(lim)
    ax.set_xlabel("predicted κ (phase table, theory §4)")
    ax.set_ylabel("measured κ (mean over seeds, 95% CI)")
    for arm in cfg.arms:
        ax.plot([], [], "o", color=ARM_COLORS.get(arm), label=arm)
    for s in settings:
        ax.plot([], [], markers[s.name], color="k", label=s.name)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("PAH exponents: measured vs predicted")
    fig.tight_layout()
    fig.savefig(out / "kappa_measured_vs_predicted.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
