"""Transformer recipe: CRH alignment of every Linear layer of a small transformer over training.

A :class:`canonreg.models.TinyTransformer` (pre-norm, causal attention written with plain
``nn.Linear`` projections ``q, k, v, o``, a GELU MLP ``fc1, fc2``, and a Linear ``head``; predicts from
the last position) learns modular addition: the sequence ``[a, b, =]`` → ``(a + b) mod p``
(:func:`canonreg.data.modular_addition`, all ``p²`` pairs split once into train and test by
``data_seed``). Full-batch training under the four arms of :mod:`canonreg.experiment` (baseline,
AlignmentLoss, NoiseCalibrated, both; same data, initialisation and number of steps per seed;
AdamW with decoupled weight decay γ in every arm — applied by the wrapper in the noise arms).
The defaults (``lr = 1e-3``, ``γ = 4``, 60% of the pairs for training, 1000 steps) were chosen so
that generalisation happens within the budget: in a check with plain AdamW decaying *every* parameter
(seed 0, no monitor) the model fits the training set by ~200 steps, stays at the ≈ 0.58 test accuracy
that commutativity alone gives, and reaches 1.00 by ~900 steps (grokking); with ``γ = 1`` this takes
> 1500 steps, and ``lr = 3e-3`` gave Adam loss spikes that made the final accuracy depend on the step
it was read at. The arms of :func:`canonreg.experiment.make_arm` decay only parameters with ≥ 2 dimensions
(weight matrices, embeddings; not biases and norm scales), which groks later, so at 1000 steps the test accuracy also measures how far
each arm has come through the transition.

Measured with a :class:`canonreg.CRHMonitor` on every Linear layer (every token position is a
sample, theory §1; ``preprocess``/``metric`` as configured, by default the paper's ``normalized`` /
``pearson``):

* **alignment over training**: every ``eval_every`` steps the monitor is attached for the last
  ``window`` steps of the segment; ``α`` of the six relations per layer (theory §2–§3), averaged
  per layer *type* (``q, k, v, o, fc1, fc2`` over blocks; ``head``) and over the six relations;
* **the six relations at the end** (the last window), per layer type;
* **PAH exponents** (theory §4): ``A ∝ B^κ`` for each relation pair ``(A, B)`` of
  :data:`canonreg.RELATION_PAIRS`, fitted on ``B``'s eigenbasis with a bootstrap interval, per layer;
  summarised per layer type. The paper quotes exponents ≈ 3, 2, 1 read by eye for a 6-layer transformer
  (Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006); here they are fitted, with intervals over
  seeds, for a smaller model on a different task, so the comparison is indicative only;
* train and test accuracy (argmax of the logits).

Every number is a mean with a 95% Student-t interval over seeds. Run::

    python recipes/transformer.py --quick --out /tmp/transformer   # CI setting, < 1 minute
    python recipes/transformer.py                                    # full: 4 arms × 3 seeds

Outputs in ``--out``: ``results.md``, ``results.json`` (resolved config, environment, per-run
histories, reports' alignment and exponents, summaries) and ``alignment_over_training.png``.

References: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (CRH/PAH); Ziyin, Wang, Li & Wu,
arXiv:2402.07193 (noise equilibrium); Power et al., arXiv:2201.02177 (modular arithmetic, grokking).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import ARM_COLORS, STUDY_ARMS, check_arms, check_seeds, config_from_args, markdown_table, recipe_parser
from torch import nn

from canonreg import CRHMonitor, CRHReport
from canonreg.data import modular_addition
from canonreg.experiment import ARMS, TrialConfig, make_arm, optimizer_step
from canonreg.functional import RELATIONS
from canonreg.models import TinyTransformer
from canonreg.stats import environment, fmt_ci, mean_half_width, write_json

#: Layer types, in forward order within a block, then the head.
LAYER_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2", "head")


def layer_type(name: str) -> str:
    """``"blocks.3.fc1"`` → ``"fc1"``; ``"head"`` → ``"head"``."""
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class TransformerConfig:
    """The transformer study (defaults: full mode, 4 arms × 3 seeds).

    Task: ``p`` (modulus), ``train_fraction`` of the ``p²`` pairs for training (split by ``data_seed``).
    Model: ``d_model``, ``heads``, ``layers`` blocks. Training: full batch, ``steps`` AdamW steps at
    ``lr`` with weight decay ``weight_decay``; the arms' ``noise``, ``loss_weight`` and ``relations`` as in
    :class:`canonreg.experiment.TrialConfig`. Measurement: a ``window``-step monitor window at the end
    of every ``eval_every`` steps; ``n_bootstrap`` resamples for the exponent intervals of the last one.
    Execution: ``threads`` torch threads; the runs go one after the other in this process.
    """

    arms: tuple[str, ...] = STUDY_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    p: int = 23
    train_fraction: float = 0.6
    data_seed: int = 0
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 4.0
    noise: float | str = "auto"
    loss_weight: float = 0.1
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    steps: int = 1000
    eval_every: int = 100
    window: int = 5
    preprocess: str = "normalized"
    metric: str = "pearson"
    n_bootstrap: int = 100
    threads: int = 1
    out: str = "results/transformer"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if self.p < 3:
            raise ValueError(f"Expected `p` >= 3, but got {self.p!r}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"Expected `train_fraction` in (0, 1), but got {self.train_fraction!r}")
        for name in ("d_model", "heads", "layers", "steps", "eval_every", "window", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {getattr(self, name)!r}")
        if self.steps % self.eval_every:
            raise ValueError(f"Expected `steps` to be a multiple of `eval_every` ({self.eval_every}), but got {self.steps}")
        if self.window > self.eval_every:
            raise ValueError(f"Expected `window` <= `eval_every` ({self.eval_every}), but got {self.window}")


#: ``--quick``: two arms, two seeds, a short run (the CI setting, < 1 minute).
QUICK: dict[str, Any] = {
    "arms": ("baseline", "both"),
    "seeds": (0, 1),
    "p": 11,
    "d_model": 32,
    "layers": 1,
    "steps": 60,
    "eval_every": 30,
    "window": 3,
    "n_bootstrap": 20,
    "out": "results/transformer-quick",
}


def trial_config(cfg: TransformerConfig, arm: str, seed: int, batch_size: int) -> TrialConfig:
    """The optimizer-side :class:`TrialConfig` of one arm (``make_arm`` reads only these fields)."""
    return TrialConfig(
        arm=arm, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, noise=cfg.noise,
        loss_weight=cfg.loss_weight, relations=cfg.relations, preprocess=cfg.preprocess, metric=cfg.metric,
        batch_size=batch_size, steps=cfg.steps, eval_every=cfg.eval_every, seed=seed,
    )  # fmt: skip


def by_type(values: dict[str, float]) -> dict[str, float]:
    """Mean of ``{layer name: value}`` per layer type (NaN entries ignored)."""
    out: dict[str, float] = {}
    for kind in LAYER_TYPES:
        vals = [v for n, v in values.items() if layer_type(n) == kind and math.isfinite(v)]
        out[kind] = float(np.mean(vals)) if vals else math.nan
    return out


# ====================================================================== one arm: the visible loop
def train_arm(cfg: TransformerConfig, arm: str, seed: int) -> dict[str, Any]:
    """Train one arm on modular addition; return accuracy, alignment history and the final report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = modular_addition(cfg.p, cfg.train_fraction, cfg.data_seed)
    x, y = split.x.long(), split.y
    x_test, y_test = split.x_test.long(), split.y_test
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = TinyTransformer(cfg.p + 1, d_model=cfg.d_model, heads=cfg.heads, layers=cfg.layers, d_out=cfg.p, seq_len=3)
    opt, align = make_arm(trial_config(cfg, arm, seed, len(y)), model)
    monitor = CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    history: list[dict[str, Any]] = []
    report: CRHReport | None = None
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        for step in range(1, cfg.steps + 1):
            if (step - 1) % cfg.eval_every == cfg.eval_every - cfg.window:  # the last `window` steps of a segment
                monitor.reset()
                monitor.attach()
            model.train()
            task = F.cross_entropy(model(x), y)
            optimizer_step(opt, task, align)
            if not math.isfinite(float(task.detach())):
                raise FloatingPointError(f"Training diverged: non-finite loss at step {step} (arm {arm}, seed {seed})")
            if step % cfg.eval_every == 0:
                monitor.detach()
                final = step == cfg.steps
                report = monitor.compute(exponents=final, n_bootstrap=cfg.n_bootstrap, bootstrap_seed=seed)
                train_acc, test_acc = _accuracy(model, x, y), _accuracy(model, x_test, y_test)
                alpha_layer = {n: float(np.nanmean([report.alignment[n][r] for r in RELATIONS])) for n in report.layers}
                history.append({
                    "step": step, "train_loss": float(task.detach()), "train_acc": train_acc, "test_acc": test_acc,
                    "alpha_by_type": by_type(alpha_layer), "mean_alpha": report.mean_alignment(),
                })  # fmt: skip
    finally:
        monitor.detach()
        if align is not None:
            align.detach()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    assert report is not None  # steps is a positive multiple of eval_every
    alpha = {r: by_type({n: report.alignment[n][r] for n in report.layers}) for r in RELATIONS}
    kappa = {r: by_type({n: report.exponents[n][r].exponent for n in report.layers}) for r in RELATIONS}
    kappa_r2 = {r: by_type({n: report.exponents[n][r].r2 for n in report.layers}) for r in RELATIONS}
    final_by_type = {kind: {r: alpha[r][kind] for r in RELATIONS} for kind in LAYER_TYPES}
    exponents = {kind: {r: kappa[r][kind] for r in RELATIONS} for kind in LAYER_TYPES}
    exponent_r2 = {kind: {r: kappa_r2[r][kind] for r in RELATIONS} for kind in LAYER_TYPES}
    last = history[-1]
    return {
        "arm": arm, "seed": seed, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "train_acc": last["train_acc"], "test_acc": last["test_acc"], "train_loss": last["train_loss"],
        "mean_alpha": last["mean_alpha"], "history": history,
        "final_alignment_by_type": final_by_type, "exponents_by_type": exponents, "exponent_r2_by_type": exponent_r2,
        "report": report.to_dict(),
    }  # fmt: skip


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


# ====================================================================== study, tables, figures
def run(cfg: TransformerConfig) -> dict[str, Any]:
    """Train every (arm, seed); write tables, the figure and JSON."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            r = train_arm(cfg, arm, seed)
            runs.append(r)
            print(
                f"  {r['arm']:<8} seed={r['seed']}  train-acc={r['train_acc']:.3f}  test-acc={r['test_acc']:.3f}  "
                f"mean α={r['mean_alpha']:.3f}  ({r['seconds']:.1f}s)",
                flush=True,
            )
    summary = summarise(cfg, runs)
    timing = {
        "wall_s": time.perf_counter() - t_start,
        "train_cpu_s": sum(r["cpu_seconds"] for r in runs),
        "load_average": os.getloadavg(),
    }
    text = _markdown(cfg, runs, timing)
    (out / "results.md").write_text(text)
    print(text)
    plot_alignment(cfg, runs, out / "alignment_over_training.png")
    result = {
        "config": asdict(cfg),
        "environment": environment(),
        "timing": timing,
        "summary": summary,
        "runs": runs,
    }
    write_json(out / "results.json", result)
    return result


def summarise(cfg: TransformerConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: accuracy, mean α, α per (type, relation) and κ per (type, relation) as ``[mean, half]``."""
    out: dict[str, Any] = {}
    for arm in cfg.arms:
        sel = [r for r in runs if r["arm"] == arm]
        out[arm] = {
            "test_acc": list(mean_half_width([r["test_acc"] for r in sel])),
            "train_acc": list(mean_half_width([r["train_acc"] for r in sel])),
            "mean_alpha": list(mean_half_width([r["mean_alpha"] for r in sel])),
            "alignment": {k: {rel: list(mean_half_width([r["final_alignment_by_type"][k][rel] for r in sel])) for rel in RELATIONS} for k in LAYER_TYPES},
            "exponents": {k: {rel: list(mean_half_width([r["exponents_by_type"][k][rel] for r in sel])) for rel in RELATIONS} for k in LAYER_TYPES},
        }
    return out


def _markdown(cfg: TransformerConfig, runs: list[dict[str, Any]], timing: dict[str, Any]) -> str:
    n_train = int(cfg.p * cfg.p * cfg.train_fraction)
    parts = [
        "# Transformer: CRH alignment on modular addition",
        "",
        (
            f"TinyTransformer ({cfg.layers} blocks, d_model {cfg.d_model}, {cfg.heads} heads) on (a + b) mod {cfg.p} "
            f"({n_train} training pairs, {cfg.p * cfg.p - n_train} test pairs), full batch, {cfg.steps} {cfg.optimizer} steps at "
            f"lr {cfg.lr}, weight decay {cfg.weight_decay}; arms: noise {cfg.noise}, alignment loss weight {cfg.loss_weight} "
            f"on {', '.join(cfg.relations)}. CRHMonitor on every Linear layer ({cfg.metric} α, {cfg.preprocess}), "
            f"over the last {cfg.window} steps of every {cfg.eval_every}. Seeds {list(cfg.seeds)}; mean ± 95% Student-t interval."
        ),
        "",
        "## Accuracy and mean alignment (end of training)",
        "",
    ]
    header = ["arm", "test acc", "train acc", "mean α", *[f"α {k}" for k in LAYER_TYPES]]
    rows = []
    for arm in cfg.arms:
        sel = [r for r in runs if r["arm"] == arm]
        per_type = [fmt_ci([float(np.nanmean(list(r["final_alignment_by_type"][k].values()))) for r in sel], 2) for k in LAYER_TYPES]
        rows.append([arm, fmt_ci([r["test_acc"] for r in sel]), fmt_ci([r["train_acc"] for r in sel]), fmt_ci([r["mean_alpha"] for r in sel]), *per_type])
    parts += [markdown_table(header, rows), ""]
    for arm in cfg.arms:
        sel = [r for r in runs if r["arm"] == arm]
        parts += [f"## The six relations at the end, per layer type: {arm}", ""]
        rel_rows = [[k, *[fmt_ci([r["final_alignment_by_type"][k][rel] for r in sel], 2) for rel in RELATIONS]] for k in LAYER_TYPES]
        parts += [markdown_table(["layer type", *RELATIONS], rel_rows), ""]
    parts += [
        "## PAH exponents κ (A ∝ B^κ per relation pair, theory §4), end of training",
        "",
        (
            "Per layer: least squares of log v_iᵀAv_i on log λ_i(B) over B's eigenvalues above 1e-6 of the largest; "
            "averaged over the blocks of a type, then mean ± interval over seeds (per-layer bootstrap intervals and R² are in "
            "results.json). The paper quotes ≈ 3, 2, 1 read by eye for a 6-layer transformer; this is a smaller model on another task."
        ),
        "",
    ]
    for arm in cfg.arms:
        sel = [r for r in runs if r["arm"] == arm]
        parts += [f"### {arm}", ""]
        k_rows = [[k, *[fmt_ci([r["exponents_by_type"][k][rel] for r in sel], 2) for rel in RELATIONS]] for k in LAYER_TYPES]
        parts += [markdown_table(["layer type", *RELATIONS], k_rows), ""]
    base = [r for r in runs if r["arm"] == cfg.arms[0]]
    kappas = {(k, rel): mean_half_width([r["exponents_by_type"][k][rel] for r in base])[0] for k in LAYER_TYPES for rel in RELATIONS}
    near = {target: sorted((f"{k} {rel}" for (k, rel), v in kappas.items() if math.isfinite(v) and abs(v - target) < 0.25)) for target in (3, 2, 1)}
    parts += [
        (
            f"Entries of the {cfg.arms[0]} table within 0.25 of 3: {', '.join(near[3]) or 'none'}; of 2: {', '.join(near[2]) or 'none'}; "
            f"of 1: {', '.join(near[1]) or 'none'}."
        ),
        "",
        (
            f"Wall time {timing['wall_s']:.0f} s in one process × {cfg.threads} thread; CPU time of the "
            f"training runs {timing['train_cpu_s']:.0f} s (load average {', '.join(f'{v:.1f}' for v in timing['load_average'])} "
            f"on {os.cpu_count()} CPUs at the end, i.e. a shared machine when above the CPU count)."
        ),
        "",
    ]
    return "\n".join(parts)


def plot_alignment(cfg: TransformerConfig, runs: list[dict[str, Any]], path: Path) -> None:
    """Mean α per layer type over training, one panel per arm (mean over seeds, min–max band); test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cfg.arms) + 1
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, arm in zip(axes.flat, cfg.arms):
        sel = [r for r in runs if r["arm"] == arm]
        steps = [h["step"] for h in sel[0]["history"]]
        for i, kind in enumerate(LAYER_TYPES):
            vals = np.array([[h["alpha_by_type"][kind] for h in r["history"]] for r in sel])
            ax.plot(steps, vals.mean(0), color=colors(i), label=kind)
            ax.fill_between(steps, vals.min(0), vals.max(0), color=colors(i), alpha=0.15)
        ax.set(title=f"{arm}: mean α of the six relations", xlabel="step", ylabel="α", ylim=(-0.2, 1.0))
    axes.flat[0].legend(fontsize=7, ncol=2)
    ax = axes.flat[len(cfg.arms)]
    for arm in cfg.arms:
        sel = [r for r in runs if r["arm"] == arm]
        steps = [h["step"] for h in sel[0]["history"]]
        acc = np.array([[h["test_acc"] for h in r["history"]] for r in sel])
        ax.plot(steps, acc.mean(0), color=ARM_COLORS.get(arm, "k"), label=arm)
        ax.fill_between(steps, acc.min(0), acc.max(0), color=ARM_COLORS.get(arm, "k"), alpha=0.15)
    ax.set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> TransformerConfig:
    p = recipe_parser(__doc__, arms=ARMS)
    p.add_argument("--p", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--threads", type=int)
    return config_from_args(TransformerConfig, p, argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
