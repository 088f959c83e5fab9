"""Effect of canonreg.NoiseCalibrated on the six CRH relations: MNIST-1D MLP at batch 512, 3 seeds.

Question (issue 4, theory §5): at large batch SGD's own noise is weak. Does adding SGD-shaped noise,
balanced against the same weight decay, raise the mean alignment α over the six relations in the
hidden layers by >= 0.1 at test accuracy within 1 point of the base optimizer, and reach α >= 0.8 in
fewer steps? Same questions for Adam.

Setup: MNIST-1D (4000 train / 1000 test, generated locally by canonreg.data.mnist1d), MLP
40 → 128 → 128 → 128 → 10 (ReLU, canonreg.models.mlp, Linear layers "0", "2", "4", "6"), batch 512,
cross-entropy. Inner layers = "2" and "4" (hidden layers whose input is itself learned). The reported α
is the POST-TRAINING one (issue 9): canonreg.measure_crh (preprocess="normalized", metric="pearson",
the paper's protocol) after training, on the full training set, with the task loss's gradient only
(the wrapper is detached first, so no hook but the measurement's sees those passes); per run the mean
and the minimum over the six relations × inner layers. Summaries give means over seeds with 95 %
Student-t intervals, paired by seed against the base. A cheaper trajectory (first ``eval_samples``
training samples, every ``eval_every`` steps, on a deep copy whose copied hooks are inert) is kept
for the speed columns. The wrapper's balance terms (decay, drift, noise, signal, measured growth of
‖W‖², per step and relative to decay) and σ are recorded per layer at the end of each run.

Variants (same γ within an optimizer family):
  SGD  (momentum 0.9, lr 0.05, γ = 5e-3):
    sgd            torch SGD, coupled weight_decay=γ                     ← "the base optimizer"
    nc-0           NoiseCalibrated(noise=0): decoupled decay only       ← control: same decay rule, no noise
    nc-σ1, nc-σ3   fixed σ = 1, 3 (σ² = injected noise in units of SGD's own)
    nc-auto0.3, nc-auto1   noise="auto", target noise share τ = 0.3, 1
  Adam (lr 3e-3, γ = 0.5, decoupled as in AdamW):
    adamw          torch AdamW(weight_decay=γ)                          ← base (= NoiseCalibrated(noise=0) exactly)
    adam-nc-σ1, adam-nc-auto0.3, adam-nc-auto1

Each run records the α trajectory, final test accuracy, final training loss, the first step with
α >= 0.8 and the first step with α >= the base's final α (a speed measure that exists even when 0.8
is not reached), and the final σ and noise share per layer. Runs are independent single-threaded
processes (``--workers``). Output: benchmarks/results/optim_effect[_quick].{json,md}.

Run:  python benchmarks/optim_effect.py [--quick] [--workers 2]
Post-training studies in benchmarks/results/ (issue 9):
      python benchmarks/optim_effect.py --workers 2 --steps 2000 --seeds 0 1 2 \
          --variants sgd nc-0 nc-auto0.5 adamw adam-nc-auto0.3 adam-nc-auto0.6 --out benchmarks/results/optim_effect_post_2000
      python benchmarks/optim_effect.py --workers 2 --steps 1000 --batch 2048 --seeds 0 1 2 \
          --variants sgd nc-auto0.5 adamw adam-nc-auto0.3 --out benchmarks/results/optim_effect_post_b2048
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import canonreg
from canonreg.data import mnist1d
from canonreg.experiment import batch_indices, optimizer_step
from canonreg.measure import measure_crh
from canonreg.models import mlp
from canonreg.optim import NoiseCalibrated
from canonreg.stats import environment, mean_half_width, write_json


@dataclass(frozen=True)
class Config:
    width: int = 128
    depth: int = 4
    batch: int = 512
    steps: int = 1000
    eval_every: int = 250
    eval_samples: int = 2048
    seeds: tuple[int, ...] = (0, 1, 2)
    sgd_lr: float = 0.05
    sgd_momentum: float = 0.9
    sgd_weight_decay: float = 5e-3
    adam_lr: float = 3e-3
    adam_weight_decay: float = 0.5
    threshold: float = 0.8
    hidden_layers: tuple[str, ...] = ("2", "4")
    variants: tuple[str, ...] = ("sgd", "nc-0", "nc-σ1", "nc-σ3", "nc-auto0.3", "nc-auto1", "adamw", "adam-nc-σ1", "adam-nc-auto0.3", "adam-nc-auto1")
    data_samples: int = 5000
    data_seed: int = 42


QUICK = dict(steps=120, eval_every=40, seeds=(0,), eval_samples=1024, variants=("sgd", "nc-0", "nc-auto1", "adamw", "adam-nc-auto0.3"))
def base_of(variant: str) -> str:
    """The base optimizer a variant is compared with: ``adam-…``/``adamw`` → ``adamw``, else ``sgd``."""
    return "adamw" if variant.startswith("adam") else "sgd"


def parse_variant(variant: str) -> tuple[bool, dict[str, Any]] | None:
    """``sgd | adamw`` → None (the plain bases); ``[adam-]nc-0 | [adam-]nc-σ<float> | [adam-]nc-auto<float>``
    → ``(adam, NoiseCalibrated keyword arguments)``; anything else a ValueError naming it."""
    if variant in ("sgd", "adamw"):
        return None
    adam = variant.startswith("adam-")
    rule = variant.removeprefix("adam-")
    try:
        if not rule.startswith("nc-"):
            raise ValueError(rule)
        rule = rule.removeprefix("nc-")
        if rule == "0":
            return adam, {"noise": 0.0}
        if rule.startswith("σ"):
            return adam, {"noise": float(rule[1:])}
        if rule.startswith("auto"):
            return adam, {"noise": "auto", "target_share": float(rule.removeprefix("auto"))}
        raise ValueError(rule)
    except ValueError:
        raise ValueError(
            f"Expected `variants` entries like sgd, adamw, nc-0, nc-σ3, nc-auto0.3, adam-nc-auto1, but got {variant!r}"
        ) from None


def make_optimizer(variant: str, model: torch.nn.Module, cfg: Config, seed: int) -> torch.optim.Optimizer:
    if variant == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.sgd_weight_decay)
    if variant == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.adam_lr, weight_decay=cfg.adam_weight_decay)
    parsed = parse_variant(variant)
    assert parsed is not None
    adam, kw = parsed
    base = (torch.optim.Adam(model.parameters(), lr=cfg.adam_lr) if adam
            else torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr, momentum=cfg.sgd_momentum))
    return NoiseCalibrated(base, model, weight_decay=cfg.adam_weight_decay if adam else cfg.sgd_weight_decay, seed=seed, **kw)


def mean_alpha(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> tuple[float, dict[str, dict[str, float]]]:
    probe = copy.deepcopy(model)  # hooks of the optimizer become no-ops in a copy
    monitor = canonreg.CRHMonitor(probe, layers=list(cfg.hidden_layers))
    with monitor:
        for i in range(0, x.shape[0], cfg.batch):
            probe.zero_grad()  # independent passes, not gradient accumulation
            F.cross_entropy(probe(x[i : i + cfg.batch]), y[i : i + cfg.batch]).backward()
    alignment = monitor.compute(exponents=False).alignment
    values = [a for rel in alignment.values() for a in rel.values()]
    return sum(values) / len(values), alignment


def post_training_alpha(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> tuple[float, float, dict[str, dict[str, float]]]:
    """(mean α, min α, α per layer and relation) on the whole training set, task loss only."""
    report = measure_crh(model, x, y, layers=list(cfg.hidden_layers), batch_size=1024)
    alignment = report.alignment
    values = [a for rel in alignment.values() for a in rel.values()]
    return statistics.fmean(values), min(values), alignment


def run(variant: str, seed: int, cfg: Config) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = mnist1d(cfg.data_samples, cfg.data_seed)
    torch.manual_seed(seed)
    model = mlp(data.num_features, cfg.width, cfg.depth, data.num_classes)
    opt = make_optimizer(variant, model, cfg, seed)
    x_eval, y_eval = data.x[: cfg.eval_samples], data.y[: cfg.eval_samples]
    batches = batch_indices(data.x.shape[0], cfg.batch, seed)
    trajectory: list[tuple[int, float]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = next(batches)
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        optimizer_step(opt, loss, None)
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            trajectory.append((step, mean_alpha(model, x_eval, y_eval, cfg)[0]))
    if isinstance(opt, NoiseCalibrated):
        opt.detach()  # the post-training measurement sees the task loss only
    final_alpha, min_alpha, per_relation = post_training_alpha(model, data.x, data.y, cfg)
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        train_acc = float((model(data.x).argmax(1) == data.y).float().mean())
    out: dict[str, Any] = {
        "variant": variant, "seed": seed, "alpha": final_alpha, "min_alpha": min_alpha, "alignment": per_relation,
        "test_acc": acc, "train_acc": train_acc,
        "train_loss": statistics.fmean(losses[-10:]), "trajectory": trajectory,
        "steps_to_threshold": next((s for s, a in trajectory if a >= cfg.threshold), None),
        "seconds": time.perf_counter() - t0,
    }
    if isinstance(opt, NoiseCalibrated):
        out["sigma"] = opt.noise_scale
        out["noise_share"] = {k: b.noise_share for k, b in opt.balance.items()}
        out["balance_per_decay"] = {
            k: {"drift": 2 * (1 - st.decay_rate) * st.drift / st.decay, "noise": st.total_noise / st.decay,
                "own_noise": st.unit_noise / st.decay, "signal": st.signal / st.decay, "net": st.net / st.decay,
                "measured_growth": st.growth / st.decay}
            for k, st in opt.balance_state.items() if st.decay > 0
        }
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], cfg: Config) -> dict[str, dict[str, Any]]:
    by = {(r["variant"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for v in cfg.variants:
        base = base_of(v)
        seeds = [s for s in cfg.seeds if (v, s) in by and (base, s) in by]
        d_alpha = [by[v, s]["alpha"] - by[base, s]["alpha"] for s in seeds]
        d_acc = [100 * (by[v, s]["test_acc"] - by[base, s]["test_acc"]) for s in seeds]
        # speed: first step at which the variant reaches the base's final α (paired by seed)
        reach_base = []
        for s in seeds:
            target = by[base, s]["alpha"]
            reach_base.append(next((st for st, a in by[v, s]["trajectory"] if a >= target), None))
        reached = [by[v, s]["steps_to_threshold"] for s in seeds]
        base_reached = [by[base, s]["steps_to_threshold"] for s in seeds]
        ratios = [b / w for b, w in zip(base_reached, reached) if b is not None and w is not None]
        d_min = [by[v, s]["min_alpha"] - by[base, s]["min_alpha"] for s in seeds]
        summary = {
            "base": base,
            "alpha_ci": mean_half_width([by[v, s]["alpha"] for s in seeds]),
            "min_alpha_ci": mean_half_width([by[v, s]["min_alpha"] for s in seeds]),
            "test_acc_ci": mean_half_width([100 * by[v, s]["test_acc"] for s in seeds]),
            "delta_alpha_ci": mean_half_width(d_alpha),
            "delta_min_alpha_ci": mean_half_width(d_min),
            "delta_acc_ci": mean_half_width(d_acc),
            "balance_per_decay": {s: by[v, s].get("balance_per_decay") for s in seeds},
            "alpha": _mean_sd([by[v, s]["alpha"] for s in seeds]),
            "test_acc": _mean_sd([100 * by[v, s]["test_acc"] for s in seeds]),
            "train_loss": _mean_sd([by[v, s]["train_loss"] for s in seeds]),
            "delta_alpha": _mean_sd(d_alpha),
            "delta_acc_points": _mean_sd(d_acc),
            "steps_to_threshold": reached,
            "steps_ratio_base_over_variant": statistics.fmean(ratios) if ratios else None,
            "steps_to_base_final_alpha": reach_base,
            "criteria": {
                "delta_alpha>=0.1": bool(d_alpha) and statistics.fmean(d_alpha) >= 0.1,
                "acc_within_1pt": bool(d_acc) and statistics.fmean(d_acc) >= -1.0,
                "reaches_threshold_faster": bool(ratios) and len(ratios) == len(seeds) and all(r > 1 for r in ratios),
            },
            "sigma": {s: by[v, s].get("sigma") for s in seeds},
            "noise_share": {s: by[v, s].get("noise_share") for s in seeds},
        }
        out[v] = summary
    return out


def markdown(summary: dict[str, dict[str, Any]], cfg: Config, seconds: float) -> str:
    def f(ms: tuple[float, float], d: int = 3) -> str:  # mean ± half-width (or standard deviation), "m" without one
        return f"{ms[0]:.{d}f}" if math.isnan(ms[1]) else f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"

    ci = f
    lines = [
        f"# NoiseCalibrated effect — MNIST-1D MLP {cfg.width}×{cfg.depth - 1} hidden, batch {cfg.batch}, {cfg.steps} steps, seeds {list(cfg.seeds)}",
        "",
        (
            f"Post-training α (canonreg.measure_crh on the full training set, task loss only, normalized/pearson), "
            f"inner layers {list(cfg.hidden_layers)}: mean and minimum over the six relations × layers. "
            "Mean over seeds ± 95 % t half-width; Δ paired by seed against the base."
        ),
        "",
        "| variant | base | post α mean | post α min | Δ mean α | Δ min α | test acc % | Δacc (pts) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        lines.append(
            f"| {v} | {s['base']} | {ci(s['alpha_ci'])} | {ci(s['min_alpha_ci'])} | {ci(s['delta_alpha_ci'])} | "
            f"{ci(s['delta_min_alpha_ci'])} | {ci(s['test_acc_ci'], 1)} | {ci(s['delta_acc_ci'], 1)} |"
        )
    lines += [
        "",
        f"Balance at the end (seed {cfg.seeds[0]}), per layer, each term / decay (theory §5: at stationarity "
        "drift + noise + signal ≈ decay, i.e. net ≈ measured growth ≈ 0); own = SGD's/Adam's own noise share:",
        "",
        "| variant | layer | σ | drift | noise (own) | signal | net | measured growth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        bal = s["balance_per_decay"].get(cfg.seeds[0]) or {}
        sig = s["sigma"].get(cfg.seeds[0]) or {}
        for layer, b in bal.items():
            lines.append(
                f"| {v} | {layer} | {sig.get(layer, 0.0):.2f} | {b['drift']:.2f} | {b['noise']:.2f} ({b['own_noise']:.3f}) | "
                f"{b['signal']:.3f} | {b['net']:+.2f} | {b['measured_growth']:+.2f} |"
            )
    lines += [
        "",
        "Trajectory-based columns (α on the first eval_samples training samples during training):",
        "",
        (
            f"α = mean over the six relations in hidden layers {list(cfg.hidden_layers)} (normalized, pearson). "
            f"Δ are paired by seed against the base of the family; steps to α ≥ {cfg.threshold} per seed (— = not reached)."
        ),
        "",
        (
            f"| variant | base | α | Δα | test acc % | Δacc (pts) | train loss | steps to α≥{cfg.threshold:g} | steps to base's final α "
            f"| σ per layer (seed {cfg.seeds[0]}) | noise share (seed {cfg.seeds[0]}) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        fmt_steps = lambda xs: ", ".join("—" if x is None else str(x) for x in xs)
        sig = s["sigma"].get(cfg.seeds[0])
        share = s["noise_share"].get(cfg.seeds[0])
        sig_s = "—" if not sig else " ".join(f"{k}:{val:.2g}" for k, val in sig.items())
        share_s = "—" if not share else " ".join(f"{k}:{val:.2g}" for k, val in share.items())
        lines.append(
            f"| {v} | {s['base']} | {f(s['alpha'])} | {f(s['delta_alpha'])} | {f(s['test_acc'], 1)} | {f(s['delta_acc_points'], 1)} | "
            f"{f(s['train_loss'], 2)} | {fmt_steps(s['steps_to_threshold'])} | {fmt_steps(s['steps_to_base_final_alpha'])} | {sig_s} | {share_s} |"
        )
    lines += ["", f"Wall time {seconds:.0f} s. Criteria per variant (Δα ≥ 0.1, acc within 1 pt, reaches α ≥ {cfg.threshold} faster on every seed):", ""]
    for v, s in summary.items():
        lines.append(f"- {v}: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in s["criteria"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, 5 variants (smoke test)")
    parser.add_argument("--workers", type=int, default=2, help="parallel single-threaded runs")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 512)")
    parser.add_argument("--variants", nargs="+", default=None, help="e.g. sgd nc-σ3 nc-auto0.5 adamw adam-nc-auto0.3")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/optim_effect[_quick])")
    args = parser.parse_args()
    over: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.seeds is not None:
        over["seeds"] = tuple(args.seeds)
    if args.batch is not None:
        if args.batch < 1:
            raise ValueError(f"Expected `--batch` to be a positive int, but got {args.batch}")
        over["batch"] = args.batch
    if args.variants is not None:
        for v in args.variants:
            parse_variant(v)
            if base_of(v) not in args.variants:
                raise ValueError(f"Expected `variants` to include {base_of(v)!r}, the base that {v!r} is compared with")
        over["variants"] = tuple(args.variants)
    cfg = Config(**over)
    mnist1d(cfg.data_samples, cfg.data_seed)  # generate / cache once before the workers start
    t0 = time.perf_counter()
    jobs = [(v, s) for s in cfg.seeds for v in cfg.variants]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(run, *zip(*jobs), [cfg] * len(jobs)))
    seconds = time.perf_counter() - t0
    summary = summarise(runs, cfg)
    table = markdown(summary, cfg, seconds)
    print(table)
    stem = args.out or Path(__file__).parent / "results" / ("optim_effect_quick" if args.quick else "optim_effect")
    stem.parent.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "workers": args.workers}
    write_json(stem.with_suffix(".json"), {"config": asdict(cfg), "environment": env, "seconds": seconds, "summary": summary, "runs": runs})
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
