"""How far does canonreg's CRH loss get? Full CRH (all six relations) vs accuracy, over seeds.

Arms (every arm of a seed shares the initialisation and the batch order; SGD with momentum, batch
128, coupled weight decay on weight matrices/kernels only, the conventions of
:func:`canonreg.experiment.train_trial`):

* ``plain:γ`` — ``CE(f(x), y)`` with weight decay ``γ`` (one arm per ``--baseline-wds``: the baseline
  is tuned over γ and the best mean test accuracy is the reference);
* ``crh:λ`` — ``CE + align(CE)`` with ``align = canonreg.losses.crh_loss(model, weight=λ)`` (the
  preset: all six relations on the inner layers, exact G by double backprop, see its docstring), at
  weight decay ``--crh-wd``; one arm per ``--crh-weights`` (the Pareto front is over λ).

**Measurement (the only α reported):** after training, and every ``--measure-every`` steps for the
time-to-reach columns, the alignment loss is detached and :func:`canonreg.measure_crh` runs one
forward and one *task-loss* backward over the **whole training set** (fresh
:class:`~canonreg.CRHMonitor`, ``preprocess="normalized"``, ``metric="pearson"``); no G that contains
the regulariser's own gradient is ever scored. Layers: the first (its input is the data), the inner
ones (input learned; the target ``min α ≥ 0.9`` is over these × six relations) and the head, reported
separately. Times: wall time of the training steps only (measurements excluded).

Summary over seeds: mean ± 95% half-width ``t_{0.975, n−1} · s/√n``. Pareto front: arms whose
(mean test accuracy, mean min α) no other arm beats in both.

    python benchmarks/crh_reach.py                    # MLP study, writes benchmarks/results/crh_reach.{md,json}
    python benchmarks/crh_reach.py --model cnn1d      # 1-D CNN, writes crh_reach_cnn1d.{md,json}
    python benchmarks/crh_reach.py --quick            # seconds: 1 seed, 40 steps, small model

Reference: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (CRH, α, the measurement protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import canonreg
from canonreg import functional as cf
from canonreg.experiment import TrialConfig, batch_indices, build_model, load_data, optimizer_step
from canonreg.layers import layer_roles, select_layers
from canonreg.losses import CRH_PRESET, crh_loss
from canonreg.stats import environment, mean_half_width

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.8, 0.9)


@dataclass(frozen=True)
class Config:
    model: str = "mlp"  # "mlp" (Linear layers) or "cnn1d" (Conv1d stack + Linear head)
    width: int = 128  # hidden width / channels
    depth: int = 5  # weight layers (mlp: 4 hidden of `width` + head)
    num_samples: int = 5000  # MNIST-1D, 80/20 split (canonreg.data)
    steps: int = 3000
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    baseline_wds: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 3e-3)
    crh_weights: tuple[float, ...] = (0.3, 1.0, 3.0)
    crh_wd: float = 5e-4
    overrides: str = "{}"  # JSON dict of AlignmentLoss keywords replacing the preset's
    measure_every: int = 500  # post-hoc measurement period for the time-to-reach columns (0: final only)
    threads: int = 1


# ---------------------------------------------------------------------- data, model, measurement
def trial_config(cfg: Config, seed: int) -> TrialConfig:
    return TrialConfig(model=cfg.model, width=cfg.width, depth=cfg.depth, num_samples=cfg.num_samples, seed=seed,
                       batch_size=cfg.batch_size, steps=max(cfg.steps, 1), eval_every=1)


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """first / inner / head names of the measured layers, in registration order."""
    roles = layer_roles(list(select_layers(model, None)[0]))
    return {role: [n for n, r in roles.items() if r == role] for role in ("first", "inner", "head")}


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """α per layer and relation: after training, whole training set, task-loss gradient only."""
    report = canonreg.measure_crh(model, x, y, loss_fn=F.cross_entropy, batch_size=1000, preprocess="normalized", metric="pearson")
    return {layer: {r: float(a) for r, a in rel.items()} for layer, rel in report.alignment.items()}


def summarise_alpha(alpha: dict[str, dict[str, float]], groups: dict[str, list[str]]) -> dict[str, float]:
    def over(layers: list[str], fn: Any) -> float:
        return float(fn([alpha[n][r] for n in layers for r in cf.RELATIONS]))

    return {
        "min_inner": over(groups["inner"], min),
        "mean_inner": over(groups["inner"], statistics.fmean),
        "min_first": over(groups["first"], min),
        "min_head": over(groups["head"], min),
    }


# ---------------------------------------------------------------------- one training run
def train(cfg: Config, arm: str, seed: int, data: Any) -> dict[str, Any]:
    kind, value = arm.split(":")
    tcfg = trial_config(cfg, seed)
    torch.manual_seed(seed)
    model = build_model(tcfg)
    groups = layer_groups(model)
    wd = float(value) if kind == "plain" else cfg.crh_wd
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.SGD([{"params": matrices, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum)
    align = crh_loss(model, weight=float(value), **json.loads(cfg.overrides)) if kind == "crh" else None

    x, y = data.x, data.y
    batches = batch_indices(x.shape[0], cfg.batch_size, seed)
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        idx = next(batches)
        task = F.cross_entropy(model(x[idx]), y[idx])
        optimizer_step(opt, task, align)
        if not math.isfinite(float(task.detach())):
            raise FloatingPointError(f"{arm} seed {seed}: non-finite task loss at step {step}")
        train_seconds += time.perf_counter() - t0
        if (cfg.measure_every and step % cfg.measure_every == 0) or step == cfg.steps:
            if align is not None:
                align.detach()  # measure_crh refuses a model with the loss's hooks on it
            history.append({"step": step, "seconds": train_seconds, **summarise_alpha(measure(model, x, y), groups)})
            if align is not None:
                align.attach()
    if align is not None:
        align.detach()
    alpha = measure(model, x, y)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean()) * 100
        train_acc = float((model(x).argmax(1) == y).float().mean()) * 100
    reach: dict[str, Any] = {}
    for thr in THRESHOLDS:
        hit = next((h for h in history if h["min_inner"] >= thr), None)
        reach[f"steps_to_{thr}"] = hit["step"] if hit else None
        reach[f"seconds_to_{thr}"] = hit["seconds"] if hit else None
    return {"arm": arm, "seed": seed, "weight_decay": wd, "test_acc": test_acc, "train_acc": train_acc,
            "train_seconds": train_seconds, "alpha": alpha, "groups": groups, **summarise_alpha(alpha, groups),
            **reach, "history": history}


# ---------------------------------------------------------------------- statistics
def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a.split(":")[0] != "plain", float(a.split(":")[1])))
    out: dict[str, Any] = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        s: dict[str, Any] = {k: mean_half_width([r[k] for r in rs]) for k in ("test_acc", "train_acc", "min_inner", "mean_inner", "min_first", "min_head", "train_seconds")}
        for thr in THRESHOLDS:
            for what in ("steps", "seconds"):
                vals = [r[f"{what}_to_{thr}"] for r in rs]
                s[f"{what}_to_{thr}"] = mean_half_width(vals) if all(v is not None for v in vals) else None
                s[f"reached_{thr}"] = sum(v is not None for v in vals)
        s["alpha"] = {n: {rel: mean_half_width([r["alpha"][n][rel] for r in rs]) for rel in cf.RELATIONS} for n in rs[0]["alpha"]}
        out[arm] = s
    plain = [a for a in arms if a.startswith("plain")]
    best = max(plain, key=lambda a: out[a]["test_acc"][0]) if plain else None
    for arm in arms:  # paired accuracy difference to the best baseline (same seeds)
        if best is not None:
            diffs = [r["test_acc"] - b["test_acc"] for r in runs if r["arm"] == arm for b in runs if b["arm"] == best and b["seed"] == r["seed"]]
            out[arm]["acc_minus_best_baseline"] = mean_half_width(diffs)
    pts = {a: (out[a]["test_acc"][0], out[a]["min_inner"][0]) for a in arms}
    front = [a for a in arms if not any(pts[b][0] >= pts[a][0] and pts[b][1] >= pts[a][1] and pts[b] != pts[a] for b in arms)]
    return {"arms": out, "best_baseline": best, "pareto_front": sorted(front, key=lambda a: pts[a][0])}


# ---------------------------------------------------------------------- report
def fmt(ci: tuple[float, float] | None, digits: int = 3) -> str:
    if ci is None:
        return "—"
    m, h = ci
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def markdown(cfg: Config, summary: dict[str, Any], runs: list[dict[str, Any]], command: str) -> str:
    arms, groups = summary["arms"], runs[0]["groups"]
    lines = [
        f"# CRH reach: {cfg.model} on MNIST-1D",
        "",
        f"`{command}` — {cfg.model} width {cfg.width}, depth {cfg.depth} (layers: first {groups['first']}, inner "
        f"{groups['inner']}, head {groups['head']}), SGD lr {cfg.lr} momentum {cfg.momentum}, batch {cfg.batch_size}, "
        f"{cfg.steps} steps, seeds {list(cfg.seeds)}. `plain:γ` = task loss with weight decay γ; `crh:λ` = task + "
        f"`crh_loss(model, weight=λ)` (preset {CRH_PRESET | json.loads(cfg.overrides)}) at weight decay {cfg.crh_wd}.",
        "",
        "α: `canonreg.measure_crh` after training — whole training set, task-loss gradient only, normalized + pearson. "
        "Cells: mean ± 95% t half-width over seeds. `min α inner`: minimum over the six relations and the inner layers. "
        f"Steps/seconds to reach a threshold: first post-hoc measurement (every {cfg.measure_every} steps) with min α inner "
        "≥ it, training time only; `—` unless every seed reached it (n/N: seeds that did).",
        "",
        "| arm | test acc (%) | Δ acc vs best plain (paired) | min α inner | mean α inner | min α first | min α head | steps → 0.8 | s → 0.8 | steps → 0.9 | s → 0.9 | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = len(cfg.seeds)
    for arm, s in arms.items():
        d = s.get("acc_minus_best_baseline")
        lines.append(
            f"| {arm} | {fmt(s['test_acc'], 1)} | {fmt(d, 1)} | {fmt(s['min_inner'])} | {fmt(s['mean_inner'])} | "
            f"{fmt(s['min_first'])} | {fmt(s['min_head'])} | {fmt(s['steps_to_0.8'], 0)} ({s['reached_0.8']}/{n}) | "
            f"{fmt(s['seconds_to_0.8'], 0)} | {fmt(s['steps_to_0.9'], 0)} ({s['reached_0.9']}/{n}) | {fmt(s['seconds_to_0.9'], 0)} | "
            f"{fmt(s['train_seconds'], 0)} |"
        )
    lines += ["", f"Best plain baseline: `{summary['best_baseline']}`. Pareto front (test accuracy ↑, min α inner ↑): "
              + ", ".join(f"`{a}`" for a in summary["pareto_front"]) + ".", "",
              "## α per layer and relation", "", "| arm | layer | " + " | ".join(cf.RELATIONS) + " |",
              "|---|---|" + "---|" * len(cf.RELATIONS)]
    for arm, s in arms.items():
        for layer, rel in s["alpha"].items():
            role = next(k for k, v in groups.items() if layer in v)
            lines.append(f"| {arm} | {layer} ({role}) | " + " | ".join(fmt(rel[r], 2) for r in cf.RELATIONS) + " |")
    lines += ["", f"Per-seed values and histories: the `.json` next to this file. torch {torch.__version__}, "
              f"{platform.platform()}, {cfg.threads} thread(s)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "cnn1d"), default="mlp")
    p.add_argument("--width", type=int, help="default 128 (mlp) / 32 (cnn1d)")
    p.add_argument("--depth", type=int, help="weight layers; default 5 (mlp) / 4 (cnn1d)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--baseline-wds", type=float, nargs="*")
    p.add_argument("--crh-weights", type=float, nargs="*")
    p.add_argument("--crh-wd", type=float)
    p.add_argument("--overrides", help="JSON dict of AlignmentLoss keywords replacing the preset's")
    p.add_argument("--measure-every", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds: 1 seed, 40 steps, width 16, 600 samples")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/crh_reach[_MODEL][_quick].json)")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="merge the runs of these result JSONs (e.g. one per seed, run in parallel) into --out; trains nothing")
    a = p.parse_args(argv)
    # defaults: Config's, then the model's, then --quick's; an explicit flag always wins
    values: dict[str, Any] = {"model": a.model}
    if a.model == "cnn1d":
        values.update(width=32, depth=4)
    if a.quick:
        values.update(width=16, steps=40, seeds=(0,), baseline_wds=(1e-4, 5e-4), crh_weights=(0.3,), measure_every=20, num_samples=600)
    given = {"width": a.width, "depth": a.depth, "steps": a.steps, "seeds": a.seeds, "baseline_wds": a.baseline_wds,
             "crh_weights": a.crh_weights, "crh_wd": a.crh_wd, "overrides": a.overrides, "measure_every": a.measure_every,
             "threads": a.threads}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})
    cfg = Config(**values)
    try:
        ok = isinstance(json.loads(cfg.overrides), dict)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        p.error(f"--overrides must be a JSON object, got {cfg.overrides!r}")
    return cfg, a


def combine(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge result files that differ only in their seeds and arms (same config otherwise) into one."""
    parts = [json.loads(p.read_text()) for p in paths]
    varying = ("seeds", "baseline_wds", "crh_weights")
    base = {k: v for k, v in parts[0]["config"].items() if k not in varying}
    for p, part in zip(paths, parts):
        if {k: v for k, v in part["config"].items() if k not in varying} != base:
            raise SystemExit(f"--combine: {p} has another config than {paths[0]} (only seeds and arms may differ)")
    for k in varying:
        base[k] = sorted({v for part in parts for v in part["config"][k]})
    runs = [r for part in parts for r in part["runs"]]
    keys = [(r["arm"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"--combine: the files repeat (arm, seed) pairs {sorted({k for k in keys if keys.count(k) > 1})}")
    seeds = tuple(sorted({r["seed"] for r in runs}))
    cfg = Config(**{**base, "seeds": seeds, **{k: tuple(v) for k, v in base.items() if isinstance(v, list)}})
    command = " && ".join(part["command"] for part in parts) + f" && python benchmarks/crh_reach.py --combine ... --out {out}"
    return write(cfg, runs, command, out, parts[0]["environment"])


def write(cfg: Config, runs: list[dict[str, Any]], command: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    summary = summarise(cfg, runs)
    result = {"config": dataclasses.asdict(cfg), "preset": CRH_PRESET, "command": command, "summary": summary, "runs": runs,
              "environment": env}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(cfg, summary, runs, command))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, a = parse(argv)
    if a.combine:
        if a.out is None:
            raise SystemExit("--combine needs --out")
        return combine(a.combine, a.out)
    torch.set_num_threads(cfg.threads)
    stem = "crh_reach" + ("" if cfg.model == "mlp" else f"_{cfg.model}") + ("_quick" if a.quick else "")
    out = a.out if a.out is not None else RESULTS / f"{stem}.json"
    data = load_data(trial_config(cfg, 0))
    arms = [f"plain:{wd:g}" for wd in cfg.baseline_wds] + [f"crh:{w:g}" for w in cfg.crh_weights]
    runs = []
    for seed in cfg.seeds:
        for arm in arms:
            r = train(cfg, arm, seed, data)
            runs.append(r)
            print(f"{arm:>12s} seed {seed}: test acc {r['test_acc']:.1f}  min α inner {r['min_inner']:.3f}  mean {r['mean_inner']:.3f}"
                  f"  first {r['min_first']:.3f}  head {r['min_head']:.3f}  ({r['train_seconds']:.0f} s)", flush=True)
    command = "python benchmarks/crh_reach.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return write(cfg, runs, command.strip(), out, environment())


if __name__ == "__main__":
    main()
