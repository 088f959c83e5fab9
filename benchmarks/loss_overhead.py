"""Overhead of :class:`canonreg.losses.AlignmentLoss` on a training step, measured in one run.

Variants (each on its own copy of one initialised MLP, same batch, SGD with momentum):

* ``plain``      — ``CE(model(x), y)``; the reference.
* ``attached``   — the same step with the loss attached but never called (hook cost only).
* ``loss``       — ``CE + align()``, f-RWA + b-RWA on every Linear layer, factored trace identities
  (``estimator="exact"``).
* ``hutch:k``    — the same with ``estimator="hutchinson", probes=k`` for each ``k`` in ``--probes``:
  every Frobenius moment from ``k`` shared Rademacher probes per side (``O(k·(n·d + d_a·d_b))``).
* ``loss/k``     — ``align()`` (weighted ``k·λ``) added on every ``k``-th step only, for each ``k`` in
  ``--every`` (per-step average over one cycle of ``k`` steps): the amortised use the exact per-step
  cost cannot avoid (see the multiply-add count below).
* ``dense``      — the naive version: ``H_a, H_b`` as ``d × d`` moments (``second_moment``), ``Z_a = WᵀW``,
  ``Z_b = WWᵀ`` built densely, scored by ``canonreg.functional.alignment``.

Timing: warm-up steps, then ``rounds`` rounds that time one step of every variant in turn
(interleaved, so load drift on a shared machine hits all variants alike); the reported per-step time is
the median over rounds and the ratio is ``median(variant) / median(plain)``, on the wall clock and on
the process CPU clock (with ``--threads 1`` the CPU clock is barely disturbed by other processes). The JSON holds config,
environment, raw timings and an analytic multiply-add count per step (plain step ``3·n·d_a·d_b`` per
layer; loss extra per layer: ``2·d_a·d_b·min(d_a,d_b)`` for ``‖WᵀW‖_F`` forward+backward,
``2·n·d·min(n,d)`` per batch Gram ``‖H‖_F``, ``3·n·d_a·d_b`` for ``⟨H_b, WWᵀ⟩``; ``⟨H_a, WᵀW⟩`` is free;
Hutchinson per sketched side of width ``d > k``: about ``6·k·n·d`` per H and ``9·k·d_a·d_b`` for both Z)
and, per ``k``, the spread of the randomized α at the initialisation (``spread_draws`` draws, every term).

    python benchmarks/loss_overhead.py            # MLP 4×1024 hidden, batch 512
    python benchmarks/loss_overhead.py --quick    # seconds: width 128, batch 64
    python benchmarks/loss_overhead.py --threads 1 --d_in 40 --probes 8 16 32 \
        --out benchmarks/results/loss_overhead_estimators.json   # 40→4×1024→10, exact vs randomized

Reference: the loss implements the alignment α of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonreg import functional as cf
from canonreg.losses import AlignmentLoss
from canonreg.models import mlp
from canonreg.stats import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_effect import alpha_draws  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    d_in: int = 1024
    width: int = 1024
    hidden: int = 4  # hidden layers of `width` units (hidden + 1 Linear layers)
    d_out: int = 10
    batch: int = 512
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    preprocess: str = "normalized"
    metric: str = "cosine"
    weight: float = 0.1
    every: tuple[int, ...] = (4, 16)  # the loss/k variants
    probes: tuple[int, ...] = (16,)  # the hutch:k variants (empty: none)
    spread_draws: int = 20
    warmup: int = 2
    rounds: int = 8
    dense: bool = True
    threads: int = 0  # 0: torch's default
    device: str = "cpu"  # e.g. cuda (timed with synchronisation)
    seed: int = 0
    out: str = str(RESULTS / "loss_overhead.json")


QUICK = {"d_in": 64, "width": 128, "batch": 64, "warmup": 2, "rounds": 6, "out": str(RESULTS / "loss_overhead_quick.json")}


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    for f in dataclasses.fields(Config):
        if f.name == "relations":
            p.add_argument("--relations", nargs="+", default=None)
        elif f.name in ("every", "probes"):
            p.add_argument(f"--{f.name}", type=int, nargs="*", default=None)
        elif f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    args = vars(p.parse_args(argv))
    quick = args.pop("quick")
    kw: dict[str, Any] = dict(QUICK) if quick else {}
    kw.update({k: (tuple(v) if k in ("relations", "every", "probes") else v) for k, v in args.items() if v is not None})
    cfg = Config(**kw)
    if not cfg.every or any(k < 2 for k in cfg.every):
        raise ValueError(f"Expected `every` to be one or more ints >= 2, but got {cfg.every!r}")
    return cfg


class DenseAlignment:
    """The naive version: capture rows with hooks, build every d × d matrix, score with functional.alignment."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.cfg = cfg
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}
        for n, m in self.layers.items():
            m.register_forward_hook(lambda mod, i, o, n=n: self.seen.__setitem__(n, (i[0], o)))

    def __call__(self) -> Tensor:
        terms = []
        for n, m in self.layers.items():
            ha, hb = self.seen[n]
            w = m.weight
            mats = {
                "H_a": cf.second_moment(ha, self.cfg.preprocess),  # type: ignore[arg-type]
                "H_b": cf.second_moment(hb, self.cfg.preprocess),  # type: ignore[arg-type]
                "Z_a": w.T @ w,
                "Z_b": w @ w.T,
            }
            for r in self.cfg.relations:
                p, q = cf.RELATION_PAIRS[r]
                terms.append(1 - cf.alignment(mats[p], mats[q], self.cfg.metric))  # type: ignore[arg-type]
        return self.cfg.weight * torch.stack(terms).mean()


def macs(cfg: Config) -> dict[str, float]:
    """Analytic multiply-adds of one step (see the module docstring)."""
    dims = [cfg.d_in] + [cfg.width] * cfg.hidden + [cfg.d_out]
    n = cfg.batch
    plain = extra = 0.0
    for i, (da, db) in enumerate(itertools.pairwise(dims)):
        plain += (2 if i == 0 else 3) * n * da * db
        extra += 2 * da * db * min(da, db)  # ‖WᵀW‖_F, forward + backward (one matmul each)
        if "f-RWA" in cfg.relations:
            extra += 2 * n * da * min(n, da)
        if "b-RWA" in cfg.relations:
            extra += 2 * n * db * min(n, db) + 3 * n * da * db
    out = {"plain": plain, "loss_extra": extra, "predicted_ratio": (plain + extra) / plain}
    for k in cfg.probes:
        hx = 0.0
        for da, db in itertools.pairwise(dims):
            hx += sum(6 * k * n * d for d in (da, db) if d > k) + (9 * k * da * db if min(da, db) > k else 2 * da * db * min(da, db))
        out[f"hutch:{k}_extra"] = hx
        out[f"hutch:{k}_predicted_ratio"] = (plain + hx) / plain
    return out


def estimator_spread(base: nn.Module, x: Tensor, cfg: Config) -> dict[str, Any]:
    """Per k: mean and std over ``spread_draws`` draws of every randomized α term, beside the exact α."""
    model = copy.deepcopy(base)
    kw: dict[str, Any] = {"metric": cfg.metric, "preprocess": cfg.preprocess}
    out: dict[str, Any] = {"exact": {t: v[0] for t, v in alpha_draws(model, x, cfg.relations, None, 1, **kw).items()}}
    for k in cfg.probes:
        draws = alpha_draws(model, x, cfg.relations, None, cfg.spread_draws, estimator="hutchinson", probes=k, **kw)
        out[str(k)] = {t: {"mean": statistics.fmean(v), "std": statistics.stdev(v)} for t, v in draws.items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base = mlp(cfg.d_in, cfg.width, cfg.hidden + 1, cfg.d_out)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    device = torch.device(cfg.device)
    base = base.to(device)
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen).to(device)
    y = torch.randint(0, cfg.d_out, (cfg.batch,), generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def make(kind: str) -> Callable[[int], None]:
        every = int(kind.split("/")[1]) if kind.startswith("loss/") else 1
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        reg: Callable[[], Tensor] | None = None
        if kind == "attached" or kind.startswith(("loss", "hutch:")):
            est = {"estimator": "hutchinson", "probes": int(kind.split(":")[1])} if kind.startswith("hutch:") else {}
            align = AlignmentLoss(
                model, cfg.relations, metric=cfg.metric, preprocess=cfg.preprocess, weight=cfg.weight * every, **est  # type: ignore[arg-type]
            )
            reg = None if kind == "attached" else align
        elif kind == "dense":
            reg = DenseAlignment(model, cfg)

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if reg is not None and i % every == 0:
                loss = loss + reg()
            loss.backward()
            opt.step()

        return step

    kinds = ["plain", "attached", "loss", *(f"loss/{k}" for k in cfg.every), *(f"hutch:{k}" for k in cfg.probes)]
    kinds += ["dense"] if cfg.dense else []
    steps = {k: make(k) for k in kinds}
    for k in kinds:
        for i in range(cfg.warmup):
            steps[k](i)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # process CPU time: barely disturbed by other processes at 1 thread
    load_before = environment()["load_average"]
    for r in range(cfg.rounds):
        for k in kinds:
            reps = int(k.split("/")[1]) if k.startswith("loss/") else 1  # one full cycle: align() on 1 of k steps
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for j in range(reps):
                steps[k](j)
            sync()
            times[k].append((time.perf_counter() - t0) / reps)
            cpu[k].append((time.process_time() - c0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "config": dataclasses.asdict(cfg),
        "environment": {**environment(), "load_average_before": load_before},
        "ms_per_step_median": {k: 1e3 * v for k, v in med.items()},
        "ms_per_step_all": {k: [1e3 * t for t in v] for k, v in times.items()},
        "ratio_to_plain": {k: med[k] / med["plain"] for k in kinds},
        "cpu_ms_per_step_median": {k: 1e3 * v for k, v in med_cpu.items()},
        "cpu_ratio_to_plain": {k: med_cpu[k] / med_cpu["plain"] for k in kinds},
        "macs": macs(cfg),
        "spread_at_init": estimator_spread(base, x, cfg) if cfg.probes else {},
    }
    print(f"MLP {cfg.d_in}→{cfg.hidden}×{cfg.width}→{cfg.d_out}, batch {cfg.batch}, relations {list(cfg.relations)}, "
          f"preprocess={cfg.preprocess}, metric={cfg.metric}, threads={torch.get_num_threads()}, rounds={cfg.rounds}")
    print(f"{'variant':<10}{'ms/step':>10}{'× plain':>10}{'CPU ms':>10}{'CPU ×':>8}")
    for k in kinds:
        print(f"{k:<10}{1e3 * med[k]:>10.1f}{result['ratio_to_plain'][k]:>10.2f}{1e3 * med_cpu[k]:>10.1f}"
              f"{result['cpu_ratio_to_plain'][k]:>8.2f}")
    m = result["macs"]
    print(f"analytic multiply-adds: plain {m['plain']:.3g}, loss extra {m['loss_extra']:.3g} → predicted {m['predicted_ratio']:.2f}× plain"
          + "".join(f"; hutch:{k} {m[f'hutch:{k}_predicted_ratio']:.2f}×" for k in cfg.probes))
    spread = result["spread_at_init"]
    for k in cfg.probes:
        stds = [v["std"] for v in spread[str(k)].values()]
        bias = [v["mean"] - spread["exact"][t] for t, v in spread[str(k)].items()]
        print(f"hutch:{k} at init: std of α̂ per term median {statistics.median(stds):.4f} max {max(stds):.4f}; "
              f"mean α̂ − α: max |{max(abs(b) for b in bias):.4f}| ({cfg.spread_draws} draws)")
    print(f"load average (1, 5, 15 min) before {load_before}, after {result['environment']['load_average']}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
