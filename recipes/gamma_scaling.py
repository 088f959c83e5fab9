"""γ-scaling recipe: does larger weight decay give stronger CRH alignment?

The noise–decay balance of theory §5 (Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006; Ziyin,
Wang, Li & Wu, arXiv:2402.07193): for SGD ``W⁺ = W + η(M − γW)`` on one layer, per unit learning rate

    Tr E[Δ(WᵀW)]/η = drift + noise − decay,
    decay = γ(2 − ηγ)‖W‖_F²,   drift = 2(1 − ηγ) E⟨g_a, h_a⟩,   noise = (η/S) E[‖g_b‖² ‖h_a‖²],

and the paper's reading is that at stationarity the decay term pins the weight Gram matrices to the
gradient-noise and drift matrices, which is what forms the relations. The only reference result is a
*direction* (the published reference results; theory §5 for the mechanism): larger γ → stronger alignment. The ratio ``ρ = η/(γS)`` says which force
dominates, and the approach to stationarity takes ``~1/(ηγ)`` steps, so every run also records the
number of decay times it trained for, ``ηγT``.

What is measured, per arm, γ and seed (an MLP on MNIST-1D; the arms of :mod:`canonreg.experiment`,
each run one :func:`~canonreg.experiment.run_trial` of the ablation runner :mod:`canonreg.ablate`):

* ``α_r`` for every relation ``r`` (Pearson of the flattened matrices, the paper's protocol:
  per-sample normalised rows), per layer and its mean over layers, from the training-time
  :class:`~canonreg.CRHMonitor` attached for the last ``window`` SGD steps (``window_alpha``);
* the balance terms above per layer over that window (``balance``), the noise share
  ``noise/decay``, ``ρ`` and ``ηγT``; test accuracy.

The direction test is a least-squares slope of ``α_r`` on ``x = log10 γ`` over all (γ, seed) runs of
an arm (:func:`ols_slope`):

    k = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²,   s² = Σ(y − ŷ)² / (n − 2),   95% CI: k ± t_{0.975, n−2} · s / √Σ(x − x̄)²,

in α per decade of γ. Runs sharing a seed share the initialisation and batch order, so the points
are not fully independent; as a check, :func:`seed_slope` fits one slope per seed and gives the
Student-t interval over those per-seed slopes (``t_{0.975, m−1} · sd / √m`` for ``m`` seeds). A
relation "follows the prediction" when the OLS interval lies above 0, "goes against it" when it
lies below, and is "flat / undecided" when it contains 0.

Arms. The baseline (plain SGD with coupled weight decay) and NoiseCalibrated (decoupled per-layer
decay γ applied by the wrapper plus calibrated SGD-shaped noise) are run on the whole γ grid: in both,
γ is the knob of the mechanism under test. The two AlignmentLoss arms cost about ten times a plain
step here (measured: ~20 ms against ~2 ms per step at width 128) and push α directly, so the γ
dependence is secondary there: they run on ``subgrid`` (by default γ = 1e-3 and 1e-2, where the
baseline's α changes most), enough for a two-level slope with an interval and for a same-γ
comparison with the other arms.

Run::

    python recipes/gamma_scaling.py --quick --out /tmp/gamma     # CI setting, < 1 minute
    python recipes/gamma_scaling.py                                # full (results/gamma_scaling)

Outputs in ``--out``: ``results.md`` (tables), ``results.json`` (resolved config, environment,
per-run records, slopes), ``alpha_vs_gamma.png``, ``balance_vs_gamma.png`` and the runner's folder
``runs/`` (``results.jsonl`` per grid: a second start resumes, only unfinished runs are trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import ARM_COLORS, STUDY_ARMS, check_arms, check_seeds, config_from_args, markdown_table, recipe_parser

from canonreg import RELATIONS
from canonreg.ablate import run_ablation
from canonreg.experiment import ARMS, config_id
from canonreg.optim import effective_lr
from canonreg.stats import environment, fmt_ci, mean_ci, t_quantile, write_json


# ====================================================================== config
@dataclass(frozen=True)
class Config:
    """The study: arms × weight decays × seeds, one MLP on MNIST-1D, plain SGD (momentum 0, so η = lr).

    ``loss_weight`` None: each arm's default (0.1 for ``loss``/``both``, the preset's for ``crh``).
    ``workers``: runner processes (0 = in this process; the numbers do not depend on it). ``resume``:
    keep the runs already finished in ``out/runs`` (the runner warns when other code produced them);
    ``--no-resume`` trains every run again.
    """

    weight_decays: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    arms: tuple[str, ...] = STUDY_ARMS
    subgrid_arms: tuple[str, ...] = ("loss", "both")  # arms run only on `subgrid`
    subgrid: tuple[float, ...] = (1e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 5000
    data_seed: int = 42
    width: int = 128
    depth: int = 4
    lr: float = 0.2
    momentum: float = 0.0
    batch_size: int = 128
    steps: int = 1500
    window: int = 100  # monitor over the last `window` steps
    noise: float | str = "auto"
    loss_weight: float | None = None
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    preprocess: str = "normalized"
    metric: str = "pearson"
    workers: int = 2
    progress: bool = False
    resume: bool = True
    out: str = "results/gamma_scaling"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if any(a not in ARMS for a in self.subgrid_arms):
            raise ValueError(f"Expected `subgrid_arms` to be names from {list(ARMS)}, but got {list(self.subgrid_arms)!r}")
        if len(set(self.weight_decays)) < 2 or len(set(self.weight_decays)) != len(self.weight_decays) or min(self.weight_decays) <= 0:
            raise ValueError(f"Expected `weight_decays` to be >= 2 distinct positive floats, but got {list(self.weight_decays)!r}")
        if len(self.subgrid) < 2 or any(g not in self.weight_decays for g in self.subgrid):
            raise ValueError(f"Expected `subgrid` to be >= 2 values of `weight_decays`, but got {list(self.subgrid)!r}")
        if not 1 <= self.window <= self.steps:
            raise ValueError(f"Expected `window` in [1, steps={self.steps}], but got {self.window!r}")
        if self.workers < 0:
            raise ValueError(f"Expected `workers` to be a non-negative int, but got {self.workers!r}")

    @property
    def eta(self) -> float:
        """SGD's long-run step ``η = lr / (1 − β)`` (theory §5; ``lr`` with the default momentum 0)."""
        return effective_lr({"lr": self.lr, "momentum": self.momentum})

    def grid(self, arm: str) -> tuple[float, ...]:
        """The weight decays ``arm`` runs on."""
        return self.subgrid if arm in self.subgrid_arms else self.weight_decays


#: ``--quick``: the CI setting (< 1 minute).
QUICK: dict[str, Any] = {"weight_decays": (1e-3, 1e-2, 3e-2), "subgrid": (1e-3, 3e-2), "seeds": (0, 1), "width": 32, "steps": 100, "window": 20}


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = recipe_parser(__doc__, arms=ARMS)
    p.add_argument("--weight-decays", nargs="+", type=float)
    p.add_argument("--subgrid", nargs="+", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction)
    return config_from_args(Config, p, argv, QUICK)


# ====================================================================== slopes with intervals
@dataclass(frozen=True)
class Slope:
    """A fitted slope ``dα / d log10 γ`` with its 95% interval; ``n`` points used."""

    slope: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def verdict(self) -> str:
        """``"+"`` (interval above 0), ``"−"`` (below 0), ``"0"`` (contains 0) or ``"?"`` (undefined)."""
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return "?"
        return "+" if self.ci_low > 0 else "−" if self.ci_high < 0 else "0"


def ols_slope(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Slope:
    """Least-squares slope of ``y`` on ``x`` with its Student-t interval.

    ``k = Sxy/Sxx``, ``se = sqrt(SSE/(n−2) / Sxx)``, interval ``k ± t_{(1+level)/2, n−2} · se``.
    Pairs with a non-finite ``y`` are dropped. NaN slope for fewer than 2 points or constant ``x``;
    NaN interval for fewer than 3 points.
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"Expected `x` and `y` to be equally long 1-D sequences, but got shapes {xa.shape} and {ya.shape}")
    keep = np.isfinite(ya) & np.isfinite(xa)
    xa, ya = xa[keep], ya[keep]
    n, nan = int(xa.size), math.nan
    sxx = float(((xa - xa.mean()) ** 2).sum()) if n else 0.0
    if n < 2 or sxx == 0:
        return Slope(nan, nan, nan, n)
    k = float(((xa - xa.mean()) * (ya - ya.mean())).sum() / sxx)
    if n < 3:
        return Slope(k, nan, nan, n)
    resid = ya - (ya.mean() + k * (xa - xa.mean()))
    half = t_quantile(0.5 + level / 2, n - 2) * math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
    return Slope(k, k - half, k + half, n)


def seed_slope(x: Sequence[float], y: Sequence[float], seeds: Sequence[int], level: float = 0.95) -> Slope:
    """Mean of per-seed OLS slopes with the Student-t interval over seeds (``n`` = seeds used): each
    seed's slope is one independent observation (runs of one seed share initialisation and batch order)."""
    xa, ya, sa = (np.asarray(v) for v in (x, y, seeds))
    iv = mean_ci([ols_slope(xa[sa == s], ya[sa == s]).slope for s in np.unique(sa)], level)
    return Slope(iv.mean, iv.low, iv.high, iv.n)


def layer_mean(alpha: dict[str, dict[str, float | None]], relation: str) -> float:
    """Mean of ``α[layer][relation]`` over layers; NaN when any layer's α is undefined (a dead layer)."""
    vals = [alpha[layer][relation] for layer in alpha]
    if any(v is None or not math.isfinite(v) for v in vals):
        return math.nan
    return float(np.mean(vals))


def relation_mean(alpha: dict[str, dict[str, float | None]], rel: str) -> float:
    """:func:`layer_mean` of one relation, or (``rel="mean"``) its mean over the six relations."""
    return float(np.mean([layer_mean(alpha, q) for q in (RELATIONS if rel == "mean" else (rel,))]))


def balance_mean(record: dict[str, Any], layers: Sequence[str], key: str) -> float:
    """Mean over ``layers`` of one balance term; ``key="stationarity"`` is ``(drift + noise) / decay``."""
    vals = []
    for layer in layers:
        b = record["balance"][layer]
        vals.append((b["drift"] + b["noise"]) / b["decay"] if key == "stationarity" else b[key])
    return float(np.mean(vals))


def slopes(records: Sequence[dict[str, Any]], arm: str, layer: str | None = None) -> dict[str, dict[str, Slope]]:
    """``{relation or "mean": {"ols": Slope, "seed": Slope}}`` of one arm (one layer, or the layer mean)."""
    recs = [r for r in records if r["arm"] == arm]
    x = [math.log10(r["weight_decay"]) for r in recs]
    out: dict[str, dict[str, Slope]] = {}
    for rel in (*RELATIONS, "mean"):
        if layer is None:
            ys = [relation_mean(r["alpha"], rel) for r in recs]
        else:
            vs = [[r["alpha"][layer][q] for q in (RELATIONS if rel == "mean" else (rel,))] for r in recs]
            ys = [math.nan if any(a is None for a in v) else float(np.mean(v)) for v in vs]
        out[rel] = {"ols": ols_slope(x, ys), "seed": seed_slope(x, ys, [r["seed"] for r in recs])}
    return out


# ====================================================================== the study
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Every (arm, γ, seed) is one trial of the ablation runner: trained by canonreg.experiment's loop
    # (same data, initialisation and batch order per seed in every arm), the monitor attached for the
    # last `window` steps only. Two grids: the full γ grid and the loss arms' subgrid.
    fixed = {
        "dataset": "mnist1d", "num_samples": cfg.num_samples, "data_seed": cfg.data_seed, "model": "mlp",
        "width": cfg.width, "depth": cfg.depth, "optimizer": "sgd", "lr": cfg.lr, "momentum": cfg.momentum,
        "noise": cfg.noise, "relations": list(cfg.relations), "batch_size": cfg.batch_size, "steps": cfg.steps,
        "preprocess": cfg.preprocess, "metric": cfg.metric, "eval_every": cfg.window, "monitor_windows": "last",
        "n_bootstrap": 0, **({} if cfg.loss_weight is None else {"loss_weight": cfg.loss_weight}),
    }  # fmt: skip
    groups = {"full": [a for a in cfg.arms if a not in cfg.subgrid_arms], "subgrid": [a for a in cfg.arms if a in cfg.subgrid_arms]}
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for name, arms in groups.items():
        if not arms:
            continue
        grid = {"arm": arms, "weight_decay": list(cfg.grid(arms[0])), "seed": list(cfg.seeds)}
        spec = {"ablation": {"name": f"gamma_scaling-{name}", "workers": cfg.workers}, "fixed": fixed, "grid": grid}
        done = run_ablation(spec, out=out / "runs" / name, resume=cfg.resume, progress=cfg.progress, plots=False)
        for trial in done.configs:
            rid = config_id(trial)
            run = {"arm": trial.arm, "weight_decay": trial.weight_decay, "seed": trial.seed, "config": trial.to_dict()}
            if rid in done.failures or rid not in done.records:  # a dead layer (α undefined in the loss) or divergence
                runs.append(run | {"failed": done.failures.get(rid, "not finished")})
                continue
            res = done.records[rid]["result"]
            runs.append(run | {
                "test_acc": res["test_acc"], "train_loss": res["window_train_loss"], "alpha": res["window_alpha"],
                "balance": res["balance"], "optimizer_balance": res["optimizer_balance"],
                "rho": cfg.eta / (trial.weight_decay * cfg.batch_size), "decay_times": cfg.eta * trial.weight_decay * cfg.steps,
                "seconds": res["wall_time_s"],
            })  # fmt: skip
    wall = time.perf_counter() - t0
    runs.sort(key=lambda r: (ARMS.index(r["arm"]), r["weight_decay"], r["seed"]))
    records = [r for r in runs if "failed" not in r]
    failures = [r for r in runs if "failed" in r]
    if not records:
        raise RuntimeError("every run failed: " + "; ".join(r["failed"] for r in failures[:3]))
    layers = list(records[0]["alpha"])

    # Slopes of α on log10 γ, per arm (layer mean) and per arm and layer.
    fits = {arm: slopes(records, arm) for arm in cfg.arms}
    layer_fits = {arm: {layer: slopes(records, arm, layer) for layer in layers} for arm in cfg.arms}

    md = report_markdown(cfg, records, failures, fits, layer_fits, layers, wall)
    (out / "results.md").write_text(md)
    print(md)
    summary = {
        "config": dataclasses.asdict(cfg),
        "environment": environment(),
        "wall_time_s": wall,
        "runs": runs,
        "slopes": {arm: {rel: {k: dataclasses.asdict(v) | {"verdict": v.verdict} for k, v in d.items()} for rel, d in f.items()} for arm, f in fits.items()},
        "layer_slopes": {
            arm: {layer: {rel: dataclasses.asdict(d["ols"]) | {"verdict": d["ols"].verdict} for rel, d in f.items()} for layer, f in lf.items()}
            for arm, lf in layer_fits.items()
        },
    }
    write_json(out / "results.json", summary)
    plot(cfg, records, fits, layers, out)
    return summary


# ====================================================================== tables
def _slope_text(s: Slope) -> str:
    if math.isnan(s.slope):
        return "nan"
    if math.isnan(s.ci_low):
        return f"{s.slope:+.3f}"
    return f"{s.slope:+.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]"


_VERDICT = {"+": "↑ follows prediction", "−": "↓ against prediction", "0": "flat / undecided", "?": "undefined"}


def report_markdown(
    cfg: Config,
    records: Sequence[dict[str, Any]],
    failures: Sequence[dict[str, Any]],
    fits: dict[str, dict[str, dict[str, Slope]]],
    layer_fits: dict[str, dict[str, dict[str, dict[str, Slope]]]],
    layers: Sequence[str],
    wall: float,
) -> str:
    """The tables of ``results.md``."""
    eta = cfg.eta
    lines = [
        "# γ-scaling: CRH alignment against weight decay",
        "",
        f"MLP {cfg.depth} layers × width {cfg.width} on MNIST-1D, SGD η = {eta:g} (momentum {cfg.momentum:g}), "
        f"batch S = {cfg.batch_size}, {cfg.steps} steps; α = {cfg.metric} on {cfg.preprocess} moments over the last "
        f"{cfg.window} steps; seeds {list(cfg.seeds)}. Arms {list(cfg.arms)}; "
        f"{list(cfg.subgrid_arms)} only at γ ∈ {list(cfg.subgrid)}. Wall time {wall:.0f} s with {cfg.workers} worker(s).",
        "",
        "## Slope of α (mean over layers) per decade of γ, 95% intervals",
        "",
        "OLS: least squares over all (γ, seed) runs, Student-t interval. Per-seed: one slope per seed, t-interval over seeds.",
        "Prediction (the published reference results; theory §5 for the mechanism): slope > 0.",
        "",
    ]
    rows = []
    for arm in cfg.arms:
        for rel, d in fits[arm].items():
            rows.append([arm, rel, str(d["ols"].n), _slope_text(d["ols"]), _slope_text(d["seed"]), _VERDICT[d["ols"].verdict]])
    lines += [markdown_table(["arm", "relation", "runs", "OLS slope [95% CI]", "per-seed slope [95% CI]", "verdict (OLS)"], rows), ""]

    lines += ["## α (mean over layers) per γ: mean ± 95% t-interval over seeds", ""]
    rows = []
    for arm in cfg.arms:
        for g in cfg.grid(arm):
            rs = [r for r in records if r["arm"] == arm and r["weight_decay"] == g]
            rows.append([arm, f"{g:.0e}"] + [fmt_ci([layer_mean(r["alpha"], q) for r in rs]) for q in RELATIONS] + [fmt_ci([r["test_acc"] for r in rs])])
    lines += [markdown_table(["arm", "γ", *RELATIONS, "test acc"], rows), ""]

    lines += [
        "## Balance terms (theory §5), mean over layers and seeds",
        "",
        "ρ = η/(γS); ηγT = decay times trained; per unit η: decay = γ(2−ηγ)‖W‖², drift = 2(1−ηγ)E⟨g_a,h_a⟩, "
        "noise = (η/S)E[‖g_b‖²‖h_a‖²] (the natural SGD noise; the wrapper's injected noise is not in it). "
        "(drift+noise)/decay ≈ 1 at stationarity. Wrapper noise/decay: NoiseCalibrated's own measurement of its "
        "injected noise against its decay (noise arms; `noise=\"auto\"` steers it to the target share).",
        "",
    ]
    rows = []
    for arm in cfg.arms:
        for g in cfg.grid(arm):
            rs = [r for r in records if r["arm"] == arm and r["weight_decay"] == g]
            cells = [fmt_ci([balance_mean(r, layers, key) for r in rs], 4) for key in ("decay", "drift", "noise")]
            cells += [fmt_ci([balance_mean(r, layers, key) for r in rs]) for key in ("noise_share", "stationarity")]
            wrapper = [float(np.mean([b["noise_share"] for b in r["optimizer_balance"].values()])) for r in rs if r["optimizer_balance"]]
            cells.append(fmt_ci(wrapper) if wrapper else "–")
            rows.append([arm, f"{g:.0e}", f"{eta / (g * cfg.batch_size):.3g}", f"{eta * g * cfg.steps:.3g}", *cells])
    header = ["arm", "γ", "ρ", "ηγT", "decay", "drift", "noise", "noise/decay", "(drift+noise)/decay", "wrapper noise/decay"]
    lines += [markdown_table(header, rows), ""]

    lines += ["## Per-layer OLS slopes (layer α per decade of γ)", ""]
    for arm in cfg.arms:
        rows = []
        for layer in layers:
            f = layer_fits[arm][layer]
            rows.append([layer] + [f"{_slope_text(f[rel]['ols'])} {f[rel]['ols'].verdict}" for rel in (*RELATIONS, "mean")])
        lines += [f"**{arm}**", "", markdown_table(["layer", *RELATIONS, "mean"], rows), ""]
    lines += ["Verdict marks: + interval above 0, − below 0, 0 contains 0, ? undefined (too few finite points).", ""]
    if failures:
        lines += ["## Runs that failed (left out of every table above)", ""]
        lines += [markdown_table(["arm", "γ", "seed", "reason"], [[r["arm"], f"{r['weight_decay']:.0e}", str(r["seed"]), r["failed"][:200]] for r in failures]), ""]
    lines += ["Code: canonreg fingerprint and git commit in results.json (`environment`).", ""]
    return "\n".join(lines)


# ====================================================================== figures
def plot(cfg: Config, records: Sequence[dict[str, Any]], fits: dict[str, dict[str, dict[str, Slope]]], layers: Sequence[str], out: Path) -> None:
    """``alpha_vs_gamma.png`` (one panel per relation, one line per arm) and ``balance_vs_gamma.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), sharex=True)
    for ax, rel in zip(axes.flat, (*RELATIONS, "mean")):
        for k, arm in enumerate(cfg.arms):
            gs = np.asarray(cfg.grid(arm))
            ivs = [mean_ci([relation_mean(r["alpha"], rel) for r in records if r["arm"] == arm and r["weight_decay"] == g]) for g in gs]
            shift = 10 ** (0.03 * (k - 1.5))  # small horizontal offsets so error bars do not overlap
            yerr = [0.0 if math.isnan(iv.half_width) else iv.half_width for iv in ivs]
            ax.errorbar(gs * shift, [iv.mean for iv in ivs], yerr=yerr, marker="o", ms=4, capsize=3, color=ARM_COLORS.get(arm), label=arm)
            s = fits[arm][rel]["ols"]
            if math.isfinite(s.slope):
                ys = np.asarray([relation_mean(r["alpha"], rel) for r in records if r["arm"] == arm])
                xs = np.asarray([math.log10(r["weight_decay"]) for r in records if r["arm"] == arm])
                ok = np.isfinite(ys)
                c = float(ys[ok].mean() - s.slope * xs[ok].mean())
                ax.plot(gs, c + s.slope * np.log10(gs), ls=":", color=ARM_COLORS.get(arm), lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.02)  # α ≤ 1; t-intervals of collapsed runs would otherwise set the scale
        ax.set_title(rel if rel != "mean" else "mean over relations")
        ax.set_ylabel("α (mean over layers)")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("weight decay γ")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, loc="center", title="arm")
    fig.suptitle(f"α vs γ: mean ± 95% t-interval over {len(cfg.seeds)} seeds; dotted: OLS fit")
    fig.tight_layout()
    fig.savefig(out / "alpha_vs_gamma.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    base = cfg.arms[0]
    gs = np.asarray(cfg.grid(base))
    for layer in layers:
        groups = [[r for r in records if r["arm"] == base and r["weight_decay"] == g] for g in gs]
        axes[0].plot(gs, [mean_ci([balance_mean(r, [layer], "noise_share") for r in rs]).mean for rs in groups], marker="o", label=f"layer {layer}")
        axes[1].plot(gs, [mean_ci([balance_mean(r, [layer], "stationarity") for r in rs]).mean for rs in groups], marker="o", label=f"layer {layer}")
    axes[0].set_yscale("log")
    axes[0].set_title(f"noise / decay ({base})")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_title(f"(drift + noise) / decay ({base}); 1 = stationary")
    for arm in cfg.arms:
        gs_a = np.asarray(cfg.grid(arm))
        acc = [mean_ci([r["test_acc"] for r in records if r["arm"] == arm and r["weight_decay"] == g]) for g in gs_a]
        yerr = [0.0 if math.isnan(a.half_width) else a.half_width for a in acc]
        axes[2].errorbar(gs_a, [a.mean for a in acc], yerr=yerr, marker="o", capsize=3, color=ARM_COLORS.get(arm), label=arm)
    axes[2].set_title("test accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("weight decay γ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "balance_vs_gamma.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
