"""Effect of :class:`canonreg.losses.AlignmentLoss` on an MLP trained on MNIST-1D, over seeds.

For each seed, one initialisation and one batch order are shared by every training of
``mlp(40, width, depth, 10)`` with SGD (momentum, coupled weight decay):

* ``baseline``: ``CE(f(x), y)``;
* one arm per ``--arms`` entry ``"REL+REL@LAYERS[:λ][/ESTIMATOR]"`` (λ defaults to ``--weight``;
  ``ESTIMATOR`` is ``exact`` (default), ``hutchinson`` (``--probes`` probes) or ``hutchinsonK``):
  ``CE(f(x), y) + λ_t · align()`` with
  ``align = AlignmentLoss(model, relations, layers, estimator=…, probes=…)``, ``λ_t = λ · min(1, t / ramp)`` (``ramp = 0``:
  constant); with ``every = k > 1`` the term ``k·λ_t·align()`` is added on every ``k``-th step only
  (the same mean strength at about 1/k of the cost). ``LAYERS`` is ``hidden`` (every Linear but the head), ``inner`` (hidden but the first,
  whose input is the data) or ``all``.

Every model, and the untrained initialisation (``init``), is measured with
:class:`canonreg.CRHMonitor` (``preprocess`` and ``metric`` of the config; the other metric is
recomputed from the same matrices and kept in the JSON) on the 1000 held-out samples (forward +
backward of the cross-entropy, no step; ``--measure_on test``, the default) or with
:func:`canonreg.measure_crh` on the whole training set (``--measure_on train``), and by test accuracy.
An arm ``…/hutchinson`` whose exact twin (same spec without the suffix) also runs gets a paired
comparison: per seed, the difference of every targeted α and of test accuracy (95% t interval). Reported: every layer × all six
relations, mean and 95% interval over seeds (Student t: ``m ± t_{0.975, n−1} · s/√n``), and per arm
whether the targeted relations reach ``α ≥ target`` in every targeted layer and the paired accuracy
difference to the baseline.

Why the default arms: f-RWA and b-RWA together ask for ``H_a ∝ WᵀW`` and ``H_b ∝ WWᵀ``; with
``H_b = W H_a Wᵀ`` (raw/centred moments) this forces ``H_a`` to be flat on the row space of ``W``
(theory §4: RWA+RWA ⇒ compact ``W``). In the first layer ``H_a`` is the data covariance, which
training cannot change, so that pair cannot reach α ≈ 1 there; the ``inner`` arm leaves that layer
out, the ``b-RWA`` arm asks for one relation everywhere.

    python benchmarks/loss_effect.py            # 3 seeds, writes benchmarks/results/loss_effect.{json,md}
    python benchmarks/loss_effect.py --quick    # 1 seed, 60 steps, width 32 (a smoke run)
    python benchmarks/loss_effect.py --measure_on train --arms f-RWA+b-RWA@hidden:3 \
        f-RWA+b-RWA@hidden:3/hutchinson --out benchmarks/results/loss_effect_estimators.json \
        --markdown benchmarks/results/loss_effect_estimators.md   # exact vs randomized estimator

Reference: CRH relations and α of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import canonreg
from canonreg import CRHMonitor
from canonreg import functional as cf
from canonreg.data import Split, mnist1d
from canonreg.losses import AlignmentLoss
from canonreg.models import mlp
from canonreg.stats import environment, fmt_ci, mean_half_width

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_SETS = ("hidden", "inner", "all")


@dataclass(frozen=True)
class Config:
    num_samples: int = 5000
    data_seed: int = 42
    width: int = 128
    depth: int = 4  # Linear layers: "0", "2", … hidden, the last one is the head
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 128
    steps: int = 2000
    # λ per arm: the best of the single-seed sweeps reported in the results (λ ∈ {0.1, 1, 3, 10})
    arms: tuple[str, ...] = ("f-RWA+b-RWA@hidden:3", "f-RWA+b-RWA@inner:3", "b-RWA@hidden:1")
    weight: float = 3.0  # λ of arms without ":λ"
    ramp: int = 0
    every: int = 1
    preprocess: str = "normalized"
    metric: str = "pearson"  # the loss's score and the monitor's
    target: float = 0.9
    probes: int = 16  # of arms "…/hutchinson"
    spread_probes: tuple[int, ...] = (4, 16, 64)  # std of the randomized α at each trained arm (empty: skip)
    spread_draws: int = 50
    measure_on: str = "test"  # "test": CRHMonitor on the held-out set; "train": measure_crh on the training set
    max_acc_drop: float = 0.01
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    out: str = str(RESULTS / "loss_effect.json")
    markdown: str = str(RESULTS / "loss_effect.md")


QUICK: dict[str, Any] = {
    "width": 32, "steps": 60, "seeds": (0,), "out": str(RESULTS / "loss_effect_quick.json"), "markdown": str(RESULTS / "loss_effect_quick.md")
}


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 60 steps, width 32")
    for f in dataclasses.fields(Config):
        if f.name in ("arms", "seeds", "spread_probes"):
            p.add_argument(f"--{f.name}", nargs="*", type=str if f.name == "arms" else int, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    args = vars(p.parse_args(argv))
    kw: dict[str, Any] = dict(QUICK) if args.pop("quick") else {}
    kw.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None})
    cfg = Config(**kw)
    if cfg.every < 1:
        raise ValueError(f"Expected `every` to be a positive int, but got {cfg.every!r}")
    if cfg.measure_on not in ("test", "train"):
        raise ValueError(f"Expected `measure_on` to be 'test' or 'train', but got {cfg.measure_on!r}")
    for arm in cfg.arms:
        arm_spec(arm, cfg.weight)
        arm_estimator(arm, cfg.probes)
    return cfg


def arm_estimator(arm: str, default_probes: int = 16) -> tuple[str, int]:
    """``"…/hutchinson8"`` → ``("hutchinson", 8)``; ``"…/hutchinson"`` → ``("hutchinson", default_probes)``;
    no suffix or ``/exact`` → ``("exact", default_probes)``."""
    _, _, est = arm.partition("/")
    if est in ("", "exact"):
        return "exact", default_probes
    k = est.removeprefix("hutchinson")
    if not est.startswith("hutchinson") or not (k == "" or (k.isdigit() and int(k) > 0)):
        raise ValueError(f"Expected an arm suffix '/exact', '/hutchinson' or '/hutchinsonK' (K > 0), but got {arm!r}")
    return "hutchinson", int(k) if k else default_probes


def arm_spec(arm: str, default_weight: float = math.nan) -> tuple[tuple[str, ...], str, float]:
    """``"f-RWA+b-RWA@hidden:3"`` → ``(("f-RWA", "b-RWA"), "hidden", 3.0)`` (λ defaults to ``default_weight``;
    an estimator suffix ``/…`` is ignored here, see :func:`arm_estimator`)."""
    rels, _, rest = arm.partition("/")[0].partition("@")
    layers, _, lam = rest.partition(":")
    relations = tuple(rels.split("+"))
    try:
        weight = float(lam) if lam else default_weight
    except ValueError:
        weight = -1.0
    if layers not in LAYER_SETS or not all(r in cf.RELATIONS for r in relations) or not weight >= 0:
        raise ValueError(
            f"Expected `arms` entries 'REL+REL@LAYERS[:λ]' with relations from {list(cf.RELATIONS)}, LAYERS in "
            f"{list(LAYER_SETS)} and λ >= 0, but got {arm!r}"
        )
    return relations, layers, weight


# ---------------------------------------------------------------------- statistics
# ---------------------------------------------------------------------- one training
def measure(model: nn.Module, data: Split, cfg: Config) -> dict[str, Any]:
    """Six relations of every Linear layer (both metrics; held-out set or, with ``measure_on="train"``,
    :func:`canonreg.measure_crh` on the whole training set, task gradient only) and the test accuracy."""
    if cfg.measure_on == "train":
        report = canonreg.measure_crh(model, data.x, data.y, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    else:
        monitor = CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
        with monitor:
            for i in range(0, data.x_test.shape[0], 250):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(data.x_test[i : i + 250]), data.y_test[i : i + 250]).backward()
        model.zero_grad(set_to_none=True)
        report = monitor.compute(exponents=False)
    other = "cosine" if cfg.metric == "pearson" else "pearson"
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return {
        "test_acc": acc,
        cfg.metric: report.alignment,
        other: {n: cf.relation_alignments(report.matrices(n), other) for n in report.layers},  # type: ignore[arg-type]
    }


def train(model: nn.Module, data: Split, cfg: Config, seed: int, arm: str | None) -> dict[str, Any]:
    """Train in place; ``arm=None`` is the baseline."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    align: AlignmentLoss | None = None
    layers: list[str] = []
    relations: tuple[str, ...] = ()
    lam = 0.0
    if arm is not None:
        relations, which, lam = arm_spec(arm, cfg.weight)
        estimator, probes = arm_estimator(arm, cfg.probes)
        layers = {"hidden": linear[:-1], "inner": linear[1:-1], "all": linear}[which]
        align = AlignmentLoss(
            model, relations, layers, metric=cfg.metric, preprocess=cfg.preprocess, estimator=estimator, probes=probes  # type: ignore[arg-type]
        )
    gen = torch.Generator().manual_seed(10_000 + seed)  # the batch order: shared by both trainings of a seed
    n = data.x.shape[0]
    order = torch.randperm(n, generator=gen)
    pos, t0, last = 0, time.perf_counter(), {}
    for step in range(cfg.steps):
        if pos + cfg.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        task = F.cross_entropy(model(data.x[idx]), data.y[idx])
        loss = task
        if align is not None and step % cfg.every == 0:
            align.weight = cfg.every * lam * (min(1.0, (step + 1) / cfg.ramp) if cfg.ramp > 0 else 1.0)
            reg = align()
            loss = task + reg
            last = {"align": float(reg.detach()), "task": float(task.detach())}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if align is not None:
        align.detach()
    return {"seconds": time.perf_counter() - t0, "final": last, "layers": layers, "relations": list(relations), "weight": lam}


def alpha_draws(model: nn.Module, x: torch.Tensor, relations: Any, layers: Any, draws: int, **options: Any) -> dict[str, list[float]]:
    """``draws`` evaluations of every term's α (``"layer/relation"``) of ``AlignmentLoss(model, relations,
    layers, **options)`` after one pass of ``x`` (randomized estimators draw fresh probes each time)."""
    out: dict[str, list[float]] = {}
    with AlignmentLoss(model, relations, layers, **options) as loss:
        model(x)
        with torch.no_grad():
            for _ in range(draws):
                loss()
                for n, d in loss.last_alignment.items():
                    for r, a in d.items():
                        out.setdefault(f"{n}/{r}", []).append(float(a))
    return out


def estimator_spread(model: nn.Module, data: Split, cfg: Config, info: dict[str, Any], seed: int) -> dict[str, Any]:
    """Spread of the randomized α of a trained arm's terms on one training batch: for each ``k`` in
    ``spread_probes``, ``spread_draws`` draws of ``AlignmentLoss(..., estimator="hutchinson", probes=k)``
    against the exact α of the same batch: mean, std, and std of ``1 − α̂`` relative to ``1 − α``."""
    x = data.x[: cfg.batch]
    kw: dict[str, Any] = {"metric": cfg.metric, "preprocess": cfg.preprocess}
    ref = {t: v[0] for t, v in alpha_draws(model, x, info["relations"], info["layers"], 1, **kw).items()}
    torch.manual_seed(seed)
    out: dict[str, Any] = {"exact": ref}
    for k in cfg.spread_probes:
        draws = alpha_draws(model, x, info["relations"], info["layers"], cfg.spread_draws, estimator="hutchinson", probes=k, **kw)
        out[str(k)] = {
            t: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "rel_std_1_minus_alpha": statistics.stdev(v) / max(1e-12, 1 - ref[t])}
            for t, v in draws.items()
        }
    return out


# ---------------------------------------------------------------------- report
def summarise(cfg: Config, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(runs)
    conditions = ["init", "baseline", *cfg.arms]
    summary: dict[str, Any] = {"accuracy": {}, "alpha": {}, "arms": {}}
    for c in conditions:
        accs = [runs[s][c]["test_acc"] for s in seeds]
        summary["accuracy"][c] = dict(zip(("mean", "ci95"), mean_half_width(accs)), values=accs)
    for metric in ("pearson", "cosine"):
        layers = list(runs[seeds[0]]["baseline"][metric])
        summary["alpha"][metric] = {
            c: {
                n: {
                    r: dict(zip(("mean", "ci95"), mean_half_width(v)), values=v)
                    for r in cf.RELATIONS
                    for v in [[runs[s][c][metric][n][r] for s in seeds]]
                }
                for n in layers
            }
            for c in conditions
        }
    for arm in cfg.arms:
        info = runs[seeds[0]][arm]["train"]
        a = summary["alpha"][cfg.metric][arm]
        targeted = [a[n][r]["values"] for n in info["layers"] for r in info["relations"]]
        drops = [runs[s]["baseline"]["test_acc"] - runs[s][arm]["test_acc"] for s in seeds]
        summary["arms"][arm] = {
            "layers": info["layers"],
            "relations": info["relations"],
            "targets_reached_mean": all(statistics.fmean(v) >= cfg.target for v in targeted),
            "targets_reached_every_seed": all(min(v) >= cfg.target for v in targeted),
            "min_targeted_alpha": min(min(v) for v in targeted),
            "baseline_minus_arm_accuracy": dict(zip(("mean", "ci95"), mean_half_width(drops)), values=drops),
            "accuracy_within_bound_mean": statistics.fmean(drops) <= cfg.max_acc_drop,
            "train_seconds": [runs[s][arm]["train"]["seconds"] for s in seeds],
        }
    summary["estimators"] = compare_estimators(cfg, runs, summary)
    return summary


def compare_estimators(cfg: Config, runs: dict[int, dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Per randomized arm with an exact twin in the run: paired (per seed) differences randomized − exact."""
    seeds = sorted(runs)
    out: dict[str, Any] = {}
    for arm in cfg.arms:
        twin = arm.partition("/")[0]
        if arm_estimator(arm, cfg.probes)[0] != "hutchinson" or twin not in cfg.arms:
            continue
        info = summary["arms"][arm]

        def paired(get: Any) -> dict[str, Any]:
            v = [get(runs[s][arm]) - get(runs[s][twin]) for s in seeds]
            return dict(zip(("mean", "ci95"), mean_half_width(v)), values=v)

        out[arm] = {
            "exact_twin": twin,
            "probes": arm_estimator(arm, cfg.probes)[1],
            "alpha_minus_exact": {
                f"{n}/{r}": paired(lambda run, n=n, r=r: run[cfg.metric][n][r]) for n in info["layers"] for r in info["relations"]
            },
            "accuracy_minus_exact": paired(lambda run: run["test_acc"]),
            "train_seconds_ratio": [runs[s][arm]["train"]["seconds"] / runs[s][twin]["train"]["seconds"] for s in seeds],
        }
    return out


def markdown(cfg: Config, summary: dict[str, Any], runs: dict[int, dict[str, Any]], env: dict[str, Any]) -> str:
    seeds = sorted(runs)
    conditions = ["init", "baseline", *cfg.arms]
    ramp = f", linear warm-up over {cfg.ramp} steps" if cfg.ramp else ""
    if cfg.every > 1:
        ramp += f", added as {cfg.every}·λ·align() on every {cfg.every}-th step only"
    if cfg.measure_on == "train":
        where_measured = (f"Measured by `canonreg.measure_crh(model, x_train, y_train, preprocess='{cfg.preprocess}', "
                          f"metric='{cfg.metric}')` on the whole training set (task gradient only). ")
    else:
        where_measured = (f"Measured by `CRHMonitor(preprocess='{cfg.preprocess}', metric='{cfg.metric}')` on the 1000 "
                          "held-out samples (cross-entropy backward, no step). ")
    lines = [
        "# AlignmentLoss effect: MLP on MNIST-1D",
        "",
        (f"`python benchmarks/loss_effect.py` — mlp(40, {cfg.width}, depth {cfg.depth}, 10) (Linear layers "
        f"{list(summary['alpha'][cfg.metric]['baseline'])}, the last is the head), SGD lr {cfg.lr}, momentum "
        f"{cfg.momentum}, weight decay {cfg.weight_decay}, batch {cfg.batch}, {cfg.steps} steps, {len(seeds)} seeds "
        f"{list(seeds)}. Arms `REL+REL@LAYERS:λ[/ESTIMATOR]`: `task + λ·AlignmentLoss(model, relations, layers, "
        f"metric='{cfg.metric}', preprocess='{cfg.preprocess}')`{ramp}; `hidden` = every Linear but the head, "
        "`inner` = hidden but the first (whose input is the data)."),
        "",
        where_measured + "Cells: mean ± 95% half-width over seeds (Student t). "
        "**Bold**: targeted by the arm. `init`: the untrained initialisation shared by all trainings of a seed.",
        "",
        "## Per arm",
        "",
        (f"| arm | targeted layers | all targeted α ≥ {cfg.target} (mean / every seed) | lowest targeted α | "
        "test accuracy (%) | baseline − arm (points, paired) |"),
        "|---|---|---|---|---|---|",
    ]
    yn = {True: "yes", False: "no"}
    base_acc = summary["accuracy"]["baseline"]["values"]
    lines.append(f"| baseline | — | — | — | {fmt_ci(base_acc, 2, 100)} | — |")
    for arm in cfg.arms:
        s = summary["arms"][arm]
        lines.append(
            f"| {arm} | {s['layers']} | {yn[s['targets_reached_mean']]} / {yn[s['targets_reached_every_seed']]} | "
            f"{s['min_targeted_alpha']:.3f} | {fmt_ci(summary['accuracy'][arm]['values'], 2, 100)} | "
            f"{fmt_ci(s['baseline_minus_arm_accuracy']['values'], 2, 100)} |"
        )
    for arm, c in summary["estimators"].items():
        lines += [
            "",
            f"## Randomized vs exact estimator: `{arm}` − `{c['exact_twin']}` (paired over seeds)",
            "",
            f"Training time ratio per seed (randomized / exact, whole training loop): "
            f"{[round(r, 2) for r in c['train_seconds_ratio']]}.",
            "",
            "| term | exact α | randomized α | randomized − exact |",
            "|---|---|---|---|",
        ]
        for term, d in c["alpha_minus_exact"].items():
            n, r = term.split("/")
            lines.append(
                f"| {n} {r} | {fmt_ci(summary['alpha'][cfg.metric][c['exact_twin']][n][r]['values'])} | "
                f"{fmt_ci(summary['alpha'][cfg.metric][arm][n][r]['values'])} | {fmt_ci(d['values'])} |"
            )
        lines.append(f"| test accuracy (points) | | | {fmt_ci(c['accuracy_minus_exact']['values'], 2, 100)} |")
    lines += spread_markdown(cfg, runs)
    lines += [
        "",
        f"## α ({cfg.metric}, preprocess={cfg.preprocess}), all six relations",
        "",
        "| layer | condition | " + " | ".join(cf.RELATIONS) + " |",
        "|---|---|" + "---|" * len(cf.RELATIONS),
    ]
    table = summary["alpha"][cfg.metric]
    names = list(table["baseline"])
    for n in names:
        for c in conditions:
            arm = summary["arms"].get(c)
            cells = []
            for r in cf.RELATIONS:
                text = fmt_ci(table[c][n][r]["values"])
                cells.append(f"**{text}**" if arm and n in arm["layers"] and r in arm["relations"] else text)
            kind = "head" if n == names[-1] else "hidden"
            lines.append(f"| {n} ({kind}) | {c} | " + " | ".join(cells) + " |")
    train_s = sum(runs[s][c]["train"]["seconds"] for s in seeds for c in ["baseline", *cfg.arms])
    lines += [
        "",
        (f"Per-seed accuracies, both metrics and every α: `{Path(cfg.out).name}`. Training time {train_s:.0f} s in total "
        f"on {env['platform']}, torch {env['torch']}, {env['torch_threads']} thread(s), load average at start "
        f"{[round(x, 1) for x in env['load_average']] if env['load_average'] else None}."),
    ]
    return "\n".join(lines) + "\n"


def spread_markdown(cfg: Config, runs: dict[int, dict[str, Any]]) -> list[str]:
    """Table of the randomized estimator's spread at the trained exact arms (see :func:`estimator_spread`)."""
    seeds = sorted(runs)
    lines: list[str] = []
    for arm in cfg.arms:
        if "spread" not in runs[seeds[0]][arm]:
            continue
        lines += [
            "",
            f"## Spread of the randomized α at the trained `{arm}` models ({cfg.spread_draws} draws per k, one training "
            f"batch of {cfg.batch}, every targeted term of every seed)",
            "",
            "| probes k | mean exact α | mean of (mean α̂ − α) | median std α̂ | max std α̂ | median std(1 − α̂)/(1 − α) |",
            "|---|---|---|---|---|---|",
        ]
        for k in cfg.spread_probes:
            cells = [(runs[s][arm]["spread"]["exact"][t], v) for s in seeds for t, v in runs[s][arm]["spread"][str(k)].items()]
            bias = statistics.fmean(v["mean"] - a for a, v in cells)
            stds = [v["std"] for _, v in cells]
            rel = [v["rel_std_1_minus_alpha"] for _, v in cells]
            lines.append(
                f"| {k} | {statistics.fmean(a for a, _ in cells):.3f} | {bias:+.4f} | {statistics.median(stds):.4f} | "
                f"{max(stds):.4f} | {statistics.median(rel):.3f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    env = environment()
    data = mnist1d(cfg.num_samples, cfg.data_seed)
    runs: dict[int, dict[str, Any]] = {}
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        init = mlp(data.num_features, cfg.width, cfg.depth, data.num_classes)
        runs[seed] = {"init": measure(copy.deepcopy(init), data, cfg)}
        for c in ["baseline", *cfg.arms]:
            model = copy.deepcopy(init)
            torch.manual_seed(seed)  # nothing random in training besides the batch order; kept for safety
            info = train(model, data, cfg, seed, None if c == "baseline" else c)
            runs[seed][c] = {**measure(model, data, cfg), "train": info}
            if c != "baseline" and cfg.spread_probes and arm_estimator(c, cfg.probes)[0] == "exact":
                runs[seed][c]["spread"] = estimator_spread(model, data, cfg, info, seed)
            alphas = runs[seed][c][cfg.metric]
            print(f"seed {seed} {c:<20} acc {100 * runs[seed][c]['test_acc']:.1f}%  {info['seconds']:.0f}s  "
                  + "  ".join(f"{n}:{r}={alphas[n][r]:.3f}" for n in info["layers"] for r in info["relations"]), flush=True)
    summary = summarise(cfg, runs)
    result = {"config": dataclasses.asdict(cfg), "environment": env, "summary": summary, "runs": runs}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = markdown(cfg, summary, runs, env)
    Path(cfg.markdown).write_text(md)
    print(md)
    print(f"wrote {out} and {cfg.markdown}")
    return result


if __name__ == "__main__":
    main()
