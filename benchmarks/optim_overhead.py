"""Overhead of canonreg.NoiseCalibrated: a training step with the wrapper vs. the same step without it.

What is timed, per variant, is one full training step on a fixed batch (``zero_grad``, forward,
cross-entropy, backward, ``step``), because the wrapper's cost sits in all of them: forward hooks keep
``m`` input rows per layer, backward hooks build the ``m``-row noise sketch, ``step`` measures the
balance, injects the noise and applies the decoupled decay.

    base:     torch.optim.SGD(momentum=0.9, weight_decay=γ)                 (coupled decay)
    wrapper:  NoiseCalibrated(SGD(momentum=0.9), model, weight_decay=γ, noise="auto")
    (and the same pair with Adam / AdamW when --adam)

Both variants run in one process on identically initialised copies of the model, interleaved in
rounds (base block, wrapper block, ...) so that load changes on a shared machine hit both alike;
the reported ratio is median(wrapper step) / median(base step). Results go to
``benchmarks/results/optim_overhead[_quick].json`` with the resolved config and the environment.

Run:  python benchmarks/optim_overhead.py [--quick] [--adam | --no-adam]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import canonreg
from canonreg.models import mlp
from canonreg.optim import NoiseCalibrated


@dataclass(frozen=True)
class Config:
    d_in: int = 1024
    width: int = 1024
    hidden_layers: int = 4
    classes: int = 10
    batch: int = 512
    lr: float = 0.05
    weight_decay: float = 5e-4
    sketch: int = 32
    warmup: int = 3
    rounds: int = 6
    steps_per_round: int = 4
    adam: bool = True
    seed: int = 0


QUICK = dict(d_in=256, width=256, batch=256, warmup=2, rounds=3, steps_per_round=3)


def environment() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "canonreg": canonreg.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, few steps (smoke test)")
    parser.add_argument("--adam", action=argparse.BooleanOptionalAction, default=True, help="also time Adam vs AdamW")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default benchmarks/results/optim_overhead[_quick].json)")
    args = parser.parse_args()
    cfg = Config(**(QUICK if args.quick else {}), adam=args.adam)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.d_in, generator=g)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    model0 = mlp(cfg.d_in, cfg.width, cfg.hidden_layers + 1, cfg.classes)

    pairs: dict[str, tuple[tuple[torch.nn.Module, torch.optim.Optimizer], tuple[torch.nn.Module, torch.optim.Optimizer]]] = {}
    m_base, m_wrap = copy.deepcopy(model0), copy.deepcopy(model0)
    pairs["sgd"] = (
        (m_base, torch.optim.SGD(m_base.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)),
        (m_wrap, NoiseCalibrated(torch.optim.SGD(m_wrap.parameters(), lr=cfg.lr, momentum=0.9), m_wrap,
                                 weight_decay=cfg.weight_decay, noise="auto", sketch=cfg.sketch, seed=cfg.seed)),
    )
    if cfg.adam:
        a_base, a_wrap = copy.deepcopy(model0), copy.deepcopy(model0)
        pairs["adam"] = (
            (a_base, torch.optim.AdamW(a_base.parameters(), lr=1e-3, weight_decay=0.1)),
            (a_wrap, NoiseCalibrated(torch.optim.Adam(a_wrap.parameters(), lr=1e-3), a_wrap,
                                     weight_decay=0.1, noise="auto", sketch=cfg.sketch, seed=cfg.seed)),
        )

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    results: dict[str, dict[str, object]] = {}
    for name, (base, wrap) in pairs.items():
        for _ in range(cfg.warmup):
            step(*base)
            step(*wrap)
        times: dict[str, list[float]] = {"base": [], "wrapper": []}
        for _ in range(cfg.rounds):
            for label, pair in (("base", base), ("wrapper", wrap)):
                times[label].extend(step(*pair) for _ in range(cfg.steps_per_round))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "median_s": med,
            "mean_s": {k: statistics.fmean(v) for k, v in times.items()},
            "times_s": times,
            "ratio": med["wrapper"] / med["base"],
            "noise_scale": wrap[1].noise_scale,  # type: ignore[union-attr]
        }
        print(f"{name:5s} base {med['base'] * 1e3:8.1f} ms   wrapper {med['wrapper'] * 1e3:8.1f} ms   ratio {results[name]['ratio']:.3f}x")

    out = args.out or Path(__file__).parent / "results" / ("optim_overhead_quick.json" if args.quick else "optim_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": asdict(cfg), "environment": environment(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
