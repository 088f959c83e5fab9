"""γ-scaling recipe: does larger weight decay give stronger CRH alignment?

The noise–decay balance of theory §5 (Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006; Ziyin,
Wang, Li & Wu, arXiv:2402.07193): for SGD ``W⁺ = W + η(M − γW)`` on one layer, per unit learning rate

    Tr E[Δ(WᵀW)]/η = drift + noise − decay,
    decay = γ(2 − ηγ)‖W‖_F²,   drift = 2(1 − ηγ) E⟨g_a, h_a⟩,   noise = (η/S) E[‖g_b‖² ‖h_a‖²],

and the paper's reading is that at stationarity the decay term pins the weight Gram matrices to the
gradient-noise and drift matrices, which is what forms the relations. The only reference result is a
*direction* (spec §8): larger γ → stronger alignment. The ratio ``ρ = η/(γS)`` says which force
dominates, and the approach to stationarity takes ``~1/(ηγ)`` steps, so every run also records the
number of decay times it trained for, ``ηγT``.

What is measured, per arm, γ and seed (an MLP on MNIST-1D; the arms of :mod:`canonreg.experiment`):

* ``α_r`` for every relation ``r`` (Pearson of the flattened matrices, the paper's protocol:
  per-sample normalised rows), per layer and its mean over layers, from a
  :class:`~canonreg.CRHMonitor` attached for the last ``window`` SGD steps;
* the balance terms above per layer (``CRHMonitor.compute(lr=η, weight_decay=γ, batch_size=S)``),
  the noise share ``noise/decay``, ``ρ`` and ``ηγT``; test accuracy.

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
per-run records, slopes), ``alpha_vs_gamma.png`` and ``balance_vs_gamma.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ARM_COLORS, STUDY_ARMS, check_arms, check_seeds, environment, markdown_table, mean_ci, parse_config, write_json  # noqa: E402

from canonreg import RELATIONS, CanonRegError, CRHMonitor  # noqa: E402
from canonreg.data import Split  # noqa: E402
from canonreg.experiment import ARMS, TrialConfig, batch_indices, build_model, load_data, make_arm, optimizer_step  # noqa: E402


@dataclass(frozen=True)
class Config:
    """The study: arms × weight decays × seeds, one MLP on MNIST-1D, plain SGD (momentum 0, so η = lr)."""

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
    loss_weight: float = 0.1
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    preprocess: str = "normalized"
    metric: str = "pearson"
    workers: int = 2
    out: str = "results/gamma_scaling"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if len(self.weight_decays) < 2 or any(not (g > 0) for g in self.weight_decays):
            raise ValueError(f"Expected `weight_decays` to be >= 2 positive floats, but got {list(self.weight_decays)!r}")
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise ValueError(f"Expected distinct `weight_decays`, but got {list(self.weight_decays)!r}")
        if any(a not in ARMS for a in self.subgrid_arms):
            raise ValueError(f"Expected `subgrid_arms` to be names from {list(ARMS)}, but got {list(self.subgrid_arms)!r}")
        extra = [g for g in self.subgrid if g not in self.weight_decays]
        if extra or len(self.subgrid) < 2:
            raise ValueError(f"Expected `subgrid` to be >= 2 values of `weight_decays`, but got {list(self.subgrid)!r}")
        if not 1 <= self.window <= self.steps:
            raise ValueError(f"Expected `window` in [1, steps={self.steps}], but got {self.window!r}")
        if self.workers < 1:
            raise ValueError(f"Expected `workers` to be a positive int, but got {self.workers!r}")

    def grid(self, arm: str) -> tuple[float, ...]:
        """The weight decays ``arm`` runs on."""
        return self.subgrid if arm in self.subgrid_arms else self.weight_decays

    def trial(self, arm: str, weight_decay: float, seed: int) -> TrialConfig:
        return TrialConfig(
            arm=arm, dataset="mnist1d", num_samples=self.num_samples, data_seed=self.data_seed, model="mlp",
            width=self.width, depth=self.depth, optimizer="sgd", lr=self.lr, momentum=self.momentum,
            weight_decay=weight_decay, noise=self.noise, loss_weight=self.loss_weight, relations=self.relations,
            batch_size=self.batch_size, steps=self.steps, seed=seed, preprocess=self.preprocess, metric=self.metric,
            eval_every=self.window, n_bootstrap=0,
        ).resolved()  # fmt: skip


QUICK: dict[str, Any] = {
    "weight_decays": (1e-3, 1e-2, 3e-2),
    "subgrid": (1e-3, 3e-2),
    "seeds": (0, 1),
    "width": 32,
    "steps": 100,
    "window": 20,
}


def source_digest() -> str:
    """First 16 hex of the SHA-256 over the ``canonreg`` sources, ``_common.py`` and this recipe.

    Stored with the results: it names the code that produced them (the package is developed in place).
    """
    import canonreg

    here = Path(__file__).resolve()
    files = sorted(Path(canonreg.__file__).resolve().parent.glob("*.py")) + [here.parent / "_common.py", here]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- one run (in a worker process)
_SPLITS: dict[tuple[str, int, int], Split] = {}


_WORKER_SOURCES: list[str] = []


def worker_sources() -> str:
    """:func:`source_digest` taken once per worker, right after importing every canonreg module the
    runs use: the code this worker's runs actually executed (a module is not re-imported later)."""
    if not _WORKER_SOURCES:
        import canonreg.losses  # noqa: F401  (imported lazily by make_arm otherwise)
        import canonreg.optim  # noqa: F401

        _WORKER_SOURCES.append(source_digest())
    return _WORKER_SOURCES[0]


def _data(cfg: TrialConfig) -> Split:
    """The split of ``cfg``, loaded once per worker process."""
    key = (cfg.dataset, cfg.num_samples, cfg.data_seed)
    if key not in _SPLITS:
        _SPLITS[key] = load_data(cfg)
    return _SPLITS[key]


def run_one(cfg: TrialConfig) -> dict[str, Any]:
    """Train one (arm, γ, seed) and measure α per layer and the SGD balance terms over the last window.

    The loop is that of :func:`canonreg.experiment.run_trial` (same seeding, same batch order:
    a fresh permutation per epoch with the tail dropped; loss ``CE + align(task)`` in the loss arms);
    the monitor is attached only for the last ``eval_every`` steps, because it is several times the
    cost of a plain step.
    """
    torch.set_num_threads(1)
    sources = worker_sources()
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    split = _data(cfg)
    x, y = split.x, split.y
    model = build_model(cfg)
    opt, align = make_arm(cfg, model)
    monitor = CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    batches = batch_indices(x.shape[0], cfg.batch_size, cfg.seed)
    window_start = cfg.steps - cfg.eval_every + 1
    window_loss = 0.0
    try:
        for step in range(1, cfg.steps + 1):
            if step == window_start:
                monitor.attach()
            idx = next(batches)
            task = F.cross_entropy(model(x[idx]), y[idx])
            optimizer_step(opt, task, align)
            task_value = float(task.detach())
            if not math.isfinite(task_value):
                raise FloatingPointError(f"Training diverged at step {step} of {cfg!r}")
            if step >= window_start:
                window_loss += task_value
    except (CanonRegError, FloatingPointError) as e:  # a dead layer (α undefined in the loss) or divergence
        failed = {"failed": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
        return {"arm": cfg.arm, "weight_decay": cfg.weight_decay, "seed": cfg.seed, "config": cfg.to_dict(), "sources": sources} | failed
    finally:
        monitor.detach()
        if align is not None:
            align.detach()
    eta = cfg.lr / (1.0 - cfg.momentum)  # spec §5: momentum β rescales η to η/(1 − β)
    report = monitor.compute(lr=eta, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, exponents=False)
    with torch.no_grad():
        test_acc = float((model(split.x_test).argmax(1) == split.y_test).double().mean())
    opt_balance = getattr(opt, "balance", None)
    return {
        "arm": cfg.arm,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "sources": sources,
        "test_acc": test_acc,
        "train_loss": window_loss / cfg.eval_every,
        "alpha": report.alignment,
        "nan_reasons": report.nan_reasons,
        "balance": {name: b.to_dict() for name, b in report.balance.items()},
        "optimizer_balance": None if not opt_balance else {str(k): v.to_dict() for k, v in opt_balance.items()},
        "rho": eta / (cfg.weight_decay * cfg.batch_size),
        "decay_times": eta * cfg.weight_decay * cfg.steps,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------- slopes with intervals
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
    from scipy import stats

    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"Expected `x` and `y` to be equally long 1-D sequences, but got shapes {xa.shape} and {ya.shape}")
    keep = np.isfinite(ya) & np.isfinite(xa)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    nan = math.nan
    if n < 2:
        return Slope(nan, nan, nan, n)
    sxx = float(((xa - xa.mean()) ** 2).sum())
    if sxx == 0:
        return Slope(nan, nan, nan, n)
    k = float(((xa - xa.mean()) * (ya - ya.mean())).sum() / sxx)
    if n < 3:
        return Slope(k, nan, nan, n)
    resid = ya - (ya.mean() + k * (xa - xa.mean()))
    se = math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
    half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * se
    return Slope(k, k - half, k + half, n)


def seed_slope(x: Sequence[float], y: Sequence[float], seeds: Sequence[int], level: float = 0.95) -> Slope:
    """Mean of per-seed OLS slopes with the Student-t interval over seeds (``n`` = seeds used).

    Accounts for runs of one seed sharing initialisation and batch order: each seed's slope is one
    independent observation.
    """
    from scipy import stats

    xa, ya, sa = (np.asarray(v) for v in (x, y, seeds))
    per_seed = [ols_slope(xa[sa == s], ya[sa == s]).slope for s in np.unique(sa)]
    ks = np.asarray([k for k in per_seed if math.isfinite(k)], dtype=np.float64)
    m = int(ks.size)
    if m == 0:
        return Slope(math.nan, math.nan, math.nan, 0)
    if m == 1:
        return Slope(float(ks[0]), math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, m - 1)) * float(ks.std(ddof=1)) / math.sqrt(m)
    return Slope(float(ks.mean()), float(ks.mean()) - half, float(ks.mean()) + half, m)


def balance_mean(record: dict[str, Any], layers: Sequence[str], key: str) -> float:
    """Mean over ``layers`` of one balance term; ``key="stationarity"`` is ``(drift + noise) / decay``."""
    vals = []
    for layer in layers:
        b = record["balance"][layer]
        vals.append((b["drift"] + b["noise"]) / b["decay"] if key == "stationarity" else b[key])
    return float(np.mean(vals))


def layer_mean(alpha: dict[str, dict[str, float | None]], relation: str) -> float:
    """Mean of ``α[layer][relation]`` over layers; NaN when any layer's α is undefined (a dead layer)."""
    vals = [alpha[layer][relation] for layer in alpha]
    if any(v is None or not math.isfinite(v) for v in vals):
        return math.nan
    return float(np.mean(vals))


def slopes(records: Sequence[dict[str, Any]], arm: str, layer: str | None = None) -> dict[str, dict[str, Slope]]:
    """``{relation or "mean": {"ols": Slope, "seed": Slope}}`` of one arm (one layer, or the layer mean)."""
    recs = [r for r in records if r["arm"] == arm]
    x = [math.log10(r["weight_decay"]) for r in recs]
    s = [r["seed"] for r in recs]
    out: dict[str, dict[str, Slope]] = {}
    for rel in (*RELATIONS, "mean"):
        rels = RELATIONS if rel == "mean" else (rel,)
        ys = []
        for r in recs:
            if layer is None:
                ys.append(float(np.mean([layer_mean(r["alpha"], q) for q in rels])))
            else:
                v = [r["alpha"][layer][q] for q in rels]
                ys.append(math.nan if any(a is None for a in v) else float(np.mean(v)))
        out[rel] = {"ols": ols_slope(x, ys), "seed": seed_slope(x, ys, s)}
    return out


# ---------------------------------------------------------------------- the study
def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(Config, argv, QUICK, description=__doc__.split("\n")[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [cfg.trial(arm, g, s) for arm in cfg.arms for g in cfg.grid(arm) for s in cfg.seeds]
    print(f"gamma_scaling: {len(jobs)} runs ({', '.join(f'{a}×{len(cfg.grid(a))}γ' for a in cfg.arms)} × {len(cfg.seeds)} seeds), {cfg.workers} worker(s)")
    digest = source_digest()  # before any worker imports the package
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    # Expensive arms first so that the pool's tail is short.
    jobs.sort(key=lambda c: c.arm not in cfg.subgrid_arms)
    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_one, job) for job in jobs]):
            rec = future.result()
            runs.append(rec)
            if "failed" in rec:
                print(f"  {rec['arm']:<8} γ={rec['weight_decay']:<7.1e} seed={rec['seed']}  FAILED: {rec['failed'][:120]}", flush=True)
                continue
            print(
                f"  {rec['arm']:<8} γ={rec['weight_decay']:<7.1e} seed={rec['seed']}  acc={rec['test_acc']:.3f}  "
                f"α̅={np.nanmean([layer_mean(rec['alpha'], q) for q in RELATIONS]):.3f}  ({rec['seconds']:.1f}s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    used = sorted({r["sources"] for r in runs})
    if used != [digest]:  # a worker imported a package edited after the start
        print(f"WARNING: the runs executed different canonreg sources {used} (start: {digest})", flush=True)
        digest = f"{digest} at the start; the runs used {', '.join(used)}"
    runs.sort(key=lambda r: (ARMS.index(r["arm"]), r["weight_decay"], r["seed"]))
    records = [r for r in runs if "failed" not in r]
    failures = [r for r in runs if "failed" in r]
    if not records:
        raise RuntimeError("every run failed: " + "; ".join(r["failed"] for r in failures[:3]))
    layers = list(records[0]["alpha"])

    fits = {arm: slopes(records, arm) for arm in cfg.arms}
    layer_fits = {arm: {layer: slopes(records, arm, layer) for layer in layers} for arm in cfg.arms}
    md = report_markdown(cfg, records, failures, fits, layer_fits, layers, wall)
    md += f"\nSources (canonreg package, _common.py, this recipe): sha256 {digest}; environment in results.json.\n"
    (out / "results.md").write_text(md)
    print(md)
    summary = {
        "config": dataclasses.asdict(cfg),
        "trial_configs": {f"{r['arm']}/{r['weight_decay']:g}/{r['seed']}": r["config"] for r in runs},
        "environment": environment() | {"workers": cfg.workers, "threads_per_worker": 1, "source_sha256": digest},
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


def _cell(values: Sequence[float], digits: int = 3) -> str:
    m, h = mean_ci(values)
    if math.isnan(m):
        return "nan"
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


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
    eta = cfg.lr / (1 - cfg.momentum)
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
        "Prediction (spec §8): slope > 0.",
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
            rows.append([arm, f"{g:.0e}"] + [_cell([layer_mean(r["alpha"], q) for r in rs]) for q in RELATIONS] + [_cell([r["test_acc"] for r in rs])])
    lines += [markdown_table(["arm", "γ", *RELATIONS, "test acc"], rows), ""]

    lines += [
        "## Balance terms (spec §5), mean over layers and seeds",
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
            rho, horizon = eta / (g * cfg.batch_size), eta * g * cfg.steps
            cells = [_cell([balance_mean(r, layers, key) for r in rs], 4) for key in ("decay", "drift", "noise")]
            cells += [_cell([balance_mean(r, layers, key) for r in rs]) for key in ("noise_share", "stationarity")]
            wrapper = [float(np.mean([b["noise_share"] for b in r["optimizer_balance"].values()])) for r in rs if r["optimizer_balance"]]
            cells.append(_cell(wrapper) if wrapper else "–")
            rows.append([arm, f"{g:.0e}", f"{rho:.3g}", f"{horizon:.3g}", *cells])
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
    return "\n".join(lines)


def plot(cfg: Config, records: Sequence[dict[str, Any]], fits: dict[str, dict[str, dict[str, Slope]]], layers: Sequence[str], out: Path) -> None:
    """``alpha_vs_gamma.png`` (one panel per relation, one line per arm) and ``balance_vs_gamma.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), sharex=True)
    panels = (*RELATIONS, "mean")
    for ax, rel in zip(axes.flat, panels):
        for k, arm in enumerate(cfg.arms):
            gs = np.asarray(cfg.grid(arm))
            ms, hs = [], []
            for g in gs:
                rs = [r for r in records if r["arm"] == arm and r["weight_decay"] == g]
                qs = RELATIONS if rel == "mean" else (rel,)
                m, h = mean_ci([float(np.mean([layer_mean(r["alpha"], q) for q in qs])) for r in rs])
                ms.append(m)
                hs.append(0.0 if math.isnan(h) else h)
            shift = 10 ** (0.03 * (k - 1.5))  # small horizontal offsets so error bars do not overlap
            ax.errorbar(gs * shift, ms, yerr=hs, marker="o", ms=4, capsize=3, color=ARM_COLORS.get(arm), label=arm)
            s = fits[arm][rel]["ols"]
            if math.isfinite(s.slope):
                lx = np.log10(gs)
                ys = [float(np.mean([layer_mean(r["alpha"], q) for q in (RELATIONS if rel == "mean" else (rel,))])) for r in records if r["arm"] == arm]
                xs = [math.log10(r["weight_decay"]) for r in records if r["arm"] == arm]
                ok = np.isfinite(ys)
                c = float(np.mean(np.asarray(ys)[ok]) - s.slope * np.mean(np.asarray(xs)[ok]))
                ax.plot(gs, c + s.slope * lx, ls=":", color=ARM_COLORS.get(arm), lw=1)
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
        share = [mean_ci([balance_mean(r, [layer], "noise_share") for r in rs])[0] for rs in groups]
        ratio = [mean_ci([balance_mean(r, [layer], "stationarity") for r in rs])[0] for rs in groups]
        axes[0].plot(gs, share, marker="o", label=f"layer {layer}")
        axes[1].plot(gs, ratio, marker="o", label=f"layer {layer}")
    axes[0].set_yscale("log")
    axes[0].set_title(f"noise / decay ({base})")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_title(f"(drift + noise) / decay ({base}); 1 = stationary")
    for arm in cfg.arms:
        gs_a = np.asarray(cfg.grid(arm))
        acc = [mean_ci([r["test_acc"] for r in records if r["arm"] == arm and r["weight_decay"] == g]) for g in gs_a]
        axes[2].errorbar(gs_a, [a[0] for a in acc], yerr=[0.0 if math.isnan(a[1]) else a[1] for a in acc], marker="o", capsize=3, color=ARM_COLORS.get(arm), label=arm)
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
