"""Overhead of canonreg.NoiseCalibrated: a training step with the wrapper vs. the same step without it.

What is timed, per variant, is one full training step on a fixed batch (``zero_grad``, forward,
cross-entropy, backward, ``step``), because the wrapper's cost sits in all of them: forward hooks keep
``m`` input rows per layer, backward hooks build the ``m``-row noise sketch, ``step`` measures the
balance, injects the noise and applies the decoupled decay.

    base:     torch.optim.SGD(momentum=0.9, weight_decay=γ)                 (coupled decay)
    wrapper:  NoiseCalibrated(SGD(momentum=0.9), model, weight_decay=γ, noise="auto")
    noise1:   NoiseCalibrated(SGD(momentum=0.9), model, weight_decay=γ, noise=1.0)  (noise injected on
              every step; in "auto" mode the controller starts from σ = 0 and a short run may inject none)
    (and the same with Adam / AdamW when --adam)

Both variants run in one process on identically initialised copies of the model, interleaved in
rounds (base block, wrapper block, ...) so that load changes on a shared machine hit both alike;
the reported ratio is median(wrapper step) / median(base step). ``--device cuda`` times on a GPU
(synchronised around every step). Results go to
``benchmarks/results/optim_overhead[_quick].json`` with the resolved config and the environment.

Run:  python benchmarks/optim_overhead.py [--quick] [--adam | --no-adam]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from canonreg.models import mlp
from canonreg.optim import NoiseCalibrated
from canonreg.stats import environment, write_json


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, few steps (smoke test)")
    parser.add_argument("--adam", action=argparse.BooleanOptionalAction, default=True, help="also time Adam vs AdamW")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default benchmarks/results/optim_overhead[_quick].json)")
    args = parser.parse_args()
    cfg = Config(**(QUICK if args.quick else {}), adam=args.adam)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(args.device)
    x = torch.randn(cfg.batch, cfg.d_in, generator=g).to(device)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g).to(device)
    model0 = mlp(cfg.d_in, cfg.width, cfg.hidden_layers + 1, cfg.classes).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    Pair = tuple[torch.nn.Module, torch.optim.Optimizer]
    pairs: dict[str, dict[str, Pair]] = {}

    def wrapped(make: type[torch.optim.Optimizer], kw: dict[str, float], decay: float, noise: float | str) -> Pair:
        m = copy.deepcopy(model0)
        return m, NoiseCalibrated(make(m.parameters(), **kw), m, weight_decay=decay, noise=noise, sketch=cfg.sketch, seed=cfg.seed)

    m_base = copy.deepcopy(model0)
    sgd_kw = {"lr": cfg.lr, "momentum": 0.9}
    pairs["sgd"] = {
        "base": (m_base, torch.optim.SGD(m_base.parameters(), weight_decay=cfg.weight_decay, **sgd_kw)),
        "wrapper": wrapped(torch.optim.SGD, sgd_kw, cfg.weight_decay, "auto"),
        "noise1": wrapped(torch.optim.SGD, sgd_kw, cfg.weight_decay, 1.0),
    }
    if cfg.adam:
        a_base = copy.deepcopy(model0)
        pairs["adam"] = {
            "base": (a_base, torch.optim.AdamW(a_base.parameters(), lr=1e-3, weight_decay=0.1)),
            "wrapper": wrapped(torch.optim.Adam, {"lr": 1e-3}, 0.1, "auto"),
            "noise1": wrapped(torch.optim.Adam, {"lr": 1e-3}, 0.1, 1.0),
        }

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    results: dict[str, dict[str, object]] = {}
    for name, variants in pairs.items():
        for _ in range(cfg.warmup):
            for pair in variants.values():
                step(*pair)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(cfg.rounds):
            for label, pair in variants.items():
                times[label].extend(step(*pair) for _ in range(cfg.steps_per_round))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "median_s": med,
            "mean_s": {k: statistics.fmean(v) for k, v in times.items()},
            "times_s": times,
            "ratio": med["wrapper"] / med["base"],
            "ratio_noise1": med["noise1"] / med["base"],
            "noise_scale": variants["wrapper"][1].noise_scale,  # type: ignore[union-attr]
        }
        print(
            f"{name:5s} base {med['base'] * 1e3:8.1f} ms   wrapper(auto) {med['wrapper'] * 1e3:8.1f} ms "
            f"ratio {results[name]['ratio']:.3f}x   wrapper(σ=1) {med['noise1'] * 1e3:8.1f} ms ratio {results[name]['ratio_noise1']:.3f}x"
        )

    out = args.out or Path(__file__).parent / "results" / ("optim_overhead_quick.json" if args.quick else "optim_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "device": str(device), "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    write_json(out, {"config": asdict(cfg), "environment": env, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
