"""Compactness recipe: are canonical representations more compact?

Theory §6 (docs/theory.md; Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006): when a layer's input ``h`` obeys f-RGA
(``H ∝ G``), directions the loss ignores carry no variance, and full CRH flattens the nonzero spectrum
of ``Z`` — low-rank, equal-variance representations. This recipe trains an MLP on MNIST-1D under
the four arms of :mod:`canonreg.experiment` (baseline, AlignmentLoss, NoiseCalibrated, both; same
data, initialisation, batch order and number of steps per seed) and measures, for every hidden
representation ``h`` (the input of every Linear layer after the first, i.e. the post-ReLU
activations ``h1, h2, …``) on the TRAINING set, with ``C = Cov(h)`` and eigenvalues ``λ_i``:

* participation ratio ``PR = (Tr C)² / Tr C² = (Σλ)² / Σλ²``;
* entropy rank ``exp(−Σ p_i log p_i)``, ``p_i = λ_i / Σλ`` (Roy & Vetterli, 2007);
* ``PCs95``: the smallest ``k`` with ``Σ_{i≤k} λ_(i) ≥ 0.95 Σλ``;
* neural-collapse ``NC1 = Tr(Σ_W Σ_B⁺) / K`` (Papyan, Han & Donoho, 2020; ``Σ_W`` mean within-class
  covariance, ``Σ_B`` covariance of the ``K`` class means; 0 at full collapse);

and per model the test accuracy and the mean CRH alignment ``α`` over layers and relations
(measured after training over the whole training set with the task loss's gradient only,
:func:`canonreg.measure_crh`; ``preprocess`` and ``metric`` as configured). Lower
PR / entropy rank / PCs95 / NC1 = more compact. Each number is a mean with a 95% Student-t interval
over seeds. Run::

    python recipes/compactness.py --quick --out /tmp/compactness     # CI setting, < 1 minute
    python recipes/compactness.py                                      # full: 4 arms × 3 seeds

Every arm × seed is one run of the ablation runner (:func:`canonreg.ablate.run_ablation`, ``--workers``
processes): :func:`canonreg.experiment.run_trial` trains it with the loop every recipe and ablation
shares and measures accuracy and α; :func:`measure_run`, this recipe's measurement, computes the
layer metrics on the trained model in the same worker. Finished runs are kept in ``--out``/``runs``
(a second start trains only unfinished runs; ``--no-resume`` trains all again).

Outputs in ``--out``: ``results.md`` (tables), ``results.json`` (resolved config, environment,
per-seed records, summaries), ``compactness.png`` (each metric against depth, per arm) and ``runs/``.
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
import torch
from _common import (
    ARM_COLORS,
    ablation_spec,
    check_arms,
    check_seeds,
    config_from_args,
    finished_runs,
    hidden_representations,
    markdown_table,
    recipe_parser,
    trial_config,
)
from torch import Tensor, nn

from canonreg.ablate import run_ablation
from canonreg.data import Split
from canonreg.experiment import ARMS, TrainedTrial
from canonreg.functional import entropy_rank, n_components, nc1, participation_ratio
from canonreg.stats import environment, fmt_ci, fmt_diff, mean_half_width, write_json

#: Per-layer metrics, in table order, with their display names.
METRICS: dict[str, str] = {"pr": "participation ratio", "erank": "entropy rank", "pcs": "PCs for 95%", "nc1": "NC1"}


# ====================================================================== config
@dataclass(frozen=True)
class CompactnessConfig:
    """The compactness study (defaults: full mode, about 6 CPU-minutes with one thread).

    Training fields have the meaning of :class:`canonreg.experiment.TrialConfig` and are shared by
    all arms; ``loss_weight`` is the λ of the loss arms (None: each arm's default, 0.1 for
    ``loss``/``both``, the :func:`canonreg.crh_loss` preset's for ``crh``). ``variance``: the
    explained-variance fraction of ``PCs``; ``max_rows``: training rows used for the representation
    metrics (a seeded random subset when the split is larger); ``workers``: runner processes (0 = in
    this process; every run trains with one thread, the numbers do not depend on it); ``resume``: keep
    finished runs of ``out/runs``; ``threads``: torch threads of this process (0 = keep the default).
    """

    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 5000
    data_seed: int = 42
    width: int = 128
    depth: int = 4
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    noise: float | str = "auto"
    loss_weight: float | None = None
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    batch_size: int = 128
    steps: int = 2000
    eval_every: int = 200
    monitor_every: int = 5
    preprocess: str = "normalized"
    metric: str = "pearson"
    variance: float = 0.95
    max_rows: int = 4000
    workers: int = 2
    resume: bool = True
    threads: int = 1
    out: str = "results/compactness"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if not 0 < self.variance <= 1:
            raise ValueError(f"Expected `variance` to be a float in (0, 1], but got {self.variance!r}")
        if self.max_rows < 20:
            raise ValueError(f"Expected `max_rows` to be an int >= 20, but got {self.max_rows!r}")
        if self.threads < 0 or self.workers < 0:
            raise ValueError(f"Expected `threads` and `workers` to be non-negative ints, but got {self.threads!r}, {self.workers!r}")
        trial_config(self, self.arms[0], self.seeds[0])  # validates the training fields early


#: ``--quick``: the CI setting (< 1 minute).
QUICK: dict[str, Any] = dict(
    seeds=(0, 1), num_samples=2000, width=64, steps=100, eval_every=50, max_rows=1000,
    out="results/compactness-quick",
)  # fmt: skip



def parse_args(argv: Sequence[str] | None = None) -> CompactnessConfig:
    p = recipe_parser(__doc__, arms=ARMS, mlp=True)
    p.add_argument("--max-rows", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction)
    return config_from_args(CompactnessConfig, p, argv, QUICK)


# ====================================================================== the measurements
def layer_metrics(h: Tensor, y: Tensor, variance: float = 0.95) -> dict[str, float]:
    """Compactness of one representation ``h`` (``(n, d)``) with labels ``y``.

    Returns ``{"pr", "erank", "pcs", "nc1"}`` of ``C = Cov(h)`` (float64; see the module docstring).
    A representation without variance (a dead layer) gets NaN ranks and NC1 instead of an error.
    """
    h64 = h.detach().double()
    c = torch.cov(h64.T)
    if not float(torch.trace(c)) > 0:
        return {"pr": math.nan, "erank": math.nan, "pcs": math.nan, "nc1": math.nan}
    return {
        "pr": float(participation_ratio(c)),
        "erank": float(entropy_rank(c)),
        "pcs": float(n_components(c, variance)),
        "nc1": nc1(h64, y),
    }


@torch.no_grad()
def measure(model: nn.Module, x: Tensor, y: Tensor, variance: float) -> dict[str, dict[str, float]]:
    """:func:`layer_metrics` of every hidden representation of ``model`` on ``(x, y)``."""
    return {name: layer_metrics(h, y, variance) for name, h in hidden_representations(model, x).items()}


def measure_run(trained: TrainedTrial, split: Split, variance: float, max_rows: int) -> dict[str, dict[str, float]]:
    """The runner's measurement of one trained arm, in its worker: :func:`measure` on ``max_rows``
    training rows (a random subset drawn with ``data_seed``: the same rows for every arm and seed)."""
    rows = torch.randperm(split.x.shape[0], generator=torch.Generator().manual_seed(trained.config.data_seed))[:max_rows]
    return measure(trained.model, split.x[rows], split.y[rows], variance)


# ====================================================================== the study
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Every arm × seed: trained by run_trial (same data, initialisation and batch order per seed in every
    # arm), then measure_run on the model in the same worker (on up to max_rows training rows).
    done = run_ablation(
        ablation_spec("compactness", cfg), out=out / "runs", resume=cfg.resume, progress=False, plots=False,
        measure="compactness:measure_run", measure_args={"variance": cfg.variance, "max_rows": cfg.max_rows},
    )  # fmt: skip
    records: list[dict[str, Any]] = []
    for trial, res, layers in finished_runs(done):
        records.append({
            "arm": trial.arm, "seed": trial.seed, "test_acc": res["test_acc"], "train_acc": res["train_acc"],
            "mean_alpha": res["mean_alpha"], "min_alpha_inner": res["min_alpha_inner"], "alpha": res["alpha"],
            "train_loss": res["window_train_loss"], "train_seconds": res["train_time_s"], "layers": layers,
        })  # fmt: skip
        last = list(layers)[-1]
        print(f"  {trial.arm:<8} seed={trial.seed}  test={res['test_acc']:.3f}  α={res['mean_alpha']:.3f}  "
              f"min α inner={res['min_alpha_inner']:.3f}  PR({last})={layers[last]['pr']:.1f}  ({res['train_time_s']:.1f}s)", flush=True)  # fmt: skip

    # Tables, JSON (with the resolved configs and the environment) and the figure.
    summary = summarise(records, cfg)
    md = tables(summary, cfg)
    (out / "results.md").write_text(md + "\n")
    write_json(out / "results.json", {
        "recipe": "compactness", "config": dataclasses.asdict(cfg), "trial_config": trial_config(cfg, "both", cfg.seeds[0]).resolved().to_dict(),
        "environment": environment(), "summary": summary, "records": records, "wall_time_s": time.perf_counter() - t_start,
    })  # fmt: skip
    plot(summary, out)
    print(md)
    print(f"\nwrote {out}/results.md, results.json, compactness.png in {time.perf_counter() - t_start:.0f}s")
    return {"summary": summary, "records": records}


# ====================================================================== tables and figure
def summarise(records: list[dict[str, Any]], cfg: CompactnessConfig) -> dict[str, Any]:
    """Per arm: ``(mean, 95% half-width)`` over seeds of every scalar and per-layer metric, and the
    per-seed values (``values``)."""
    out: dict[str, Any] = {}
    for arm in cfg.arms:
        rs = [r for r in records if r["arm"] == arm]
        layers = list(rs[0]["layers"])
        values: dict[str, Any] = {k: [r[k] for r in rs] for k in ("test_acc", "train_acc", "mean_alpha", "min_alpha_inner")}
        values["layers"] = {la: {m: [r["layers"][la][m] for r in rs] for m in METRICS} for la in layers}
        out[arm] = {
            **{k: mean_half_width(values[k]) for k in ("test_acc", "train_acc", "mean_alpha", "min_alpha_inner")},
            "layers": {la: {m: mean_half_width(v) for m, v in ms.items()} for la, ms in values["layers"].items()},
            "values": values,
        }
    return out


def tables(summary: dict[str, Any], cfg: CompactnessConfig) -> str:
    """The Markdown report: accuracy and α per arm, then the four metrics per arm and layer."""
    arms = list(summary)
    v = {a: summary[a]["values"] for a in arms}
    layers = list(v[arms[0]]["layers"])
    parts = [
        "# Compactness: the arms on MNIST-1D",
        "",
        f"MLP width {cfg.width}, depth {cfg.depth}; {cfg.optimizer} lr={cfg.lr} momentum={cfg.momentum} "
        f"weight_decay={cfg.weight_decay}; {cfg.steps} steps of batch {cfg.batch_size} in every arm; "
        f"noise={cfg.noise}, loss_weight={trial_config(cfg, 'loss', cfg.seeds[0]).resolved().loss_weight:g}, relations={list(cfg.relations)} (loss/both arms); "
        f"crh arm: canonreg.crh_loss preset at λ={trial_config(cfg, 'crh', cfg.seeds[0]).resolved().loss_weight:g}. "
        f"Mean ± 95% t-interval over {len(cfg.seeds)} seeds {list(cfg.seeds)}. "
        f"α: {cfg.metric}, preprocess={cfg.preprocess}, measured after training over the whole training set with the "
        "task loss's gradient only; min α inner: the minimum over the six relations and the inner layers "
        "(every Linear but the first and the head).",
        "",
        "## Accuracy and CRH alignment",
        "",
        markdown_table(
            ["arm", "test acc", "train acc", "mean α", "min α inner"],
            [
                [a, fmt_ci(v[a]["test_acc"]), fmt_ci(v[a]["train_acc"]), fmt_ci(v[a]["mean_alpha"]), fmt_ci(v[a]["min_alpha_inner"])]
                for a in arms
            ],
        ),
        "",
        f"## Compactness of the hidden representations (training set; lower = more compact; "
        f"PCs for {cfg.variance:.0%} of the variance)",
        "",
        markdown_table(
            ["arm", "layer", *METRICS.values()],
            [
                [a, la, *(fmt_ci(v[a]["layers"][la][m], 1 if m in ("pr", "erank", "pcs") else 3) for m in METRICS)]
                for la in layers
                for a in arms
            ],
        ),
    ]
    if "baseline" in arms and len(arms) > 1:
        base = v["baseline"]
        others = [a for a in arms if a != "baseline"]
        parts += [
            "",
            "## Difference to the baseline, paired by seed (arm − baseline; * = 95% interval excludes 0)",
            "",
            markdown_table(
                ["arm", "Δ test acc", "Δ mean α", "Δ min α inner"],
                [
                    [
                        a, fmt_diff(v[a]["test_acc"], base["test_acc"]), fmt_diff(v[a]["mean_alpha"], base["mean_alpha"]),
                        fmt_diff(v[a]["min_alpha_inner"], base["min_alpha_inner"]),
                    ]
                    for a in others
                ],
            ),
            "",
            markdown_table(
                ["arm", "layer", *(f"Δ {name}" for name in METRICS.values())],
                [
                    [a, la, *(fmt_diff(v[a]["layers"][la][m], base["layers"][la][m], 1 if m in ("pr", "erank", "pcs") else 3) for m in METRICS)]
                    for la in layers
                    for a in others
                ],
            ),
        ]
    return "\n".join(parts)


def plot(summary: dict[str, Any], out: Path) -> None:
    """``compactness.png``: each metric against hidden layer, one line per arm (95% error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    layers = list(summary[arms[0]]["layers"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 3.4))
    xs = np.arange(1, len(layers) + 1)
    for ax, (m, title) in zip(axes, METRICS.items()):
        for i, a in enumerate(arms):
            mean, half = zip(*(summary[a]["layers"][la][m] for la in layers))
            err = None if any(np.isnan(half)) else list(half)
            ax.errorbar(xs + 0.06 * (i - (len(arms) - 1) / 2), mean, yerr=err, marker="o", ms=4, capsize=3, color=ARM_COLORS[a], label=a)
        ax.set_xticks(xs, layers)
        ax.set_xlabel("hidden layer")
        ax.set_title(title)
        if m == "nc1":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Compactness of hidden representations (training set; lower = more compact)")
    fig.tight_layout()
    fig.savefig(out / "compactness.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
