"""Command line: ``canonreg demo`` (the main job) and ``canonreg ablate CONFIG``.

``python -m canonreg demo`` trains a small MLP on MNIST-1D (generated locally with the ``mnist1d``
package's own generator — nothing is downloaded) for about a minute on 2 CPU cores, with the
CRHMonitor on every Linear layer, and prints the six-relation table per layer, the PAH exponents
and the balance terms; it writes the report (JSON) and figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoConfig", "run_demo", "main"]


@dataclass(frozen=True)
class DemoConfig:
    """Configuration of ``canonreg demo`` (defaults: about a minute on 2 CPU cores)."""

    steps: int = 6000
    width: int = 256
    depth: int = 4
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    window: int = 500
    preprocess: str = "normalized"
    metric: str = "pearson"
    num_samples: int = 10000
    seed: int = 0
    threads: int = 0
    out: str = "canonreg-demo"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "width", "depth", "batch_size", "window", "num_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {v!r}")
        if self.window > self.steps:
            raise ValueError(f"Expected `window` <= `steps` ({self.steps}), but got {self.window}")


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_demo(cfg: DemoConfig) -> dict[str, object]:
    """Train, monitor, print and save; returns a summary dict (also written to ``out/summary.json``)."""
    from . import CRHMonitor
    from .data import mnist1d
    from .models import mlp

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    print(f"Generating MNIST-1D locally ({cfg.num_samples} samples, mnist1d's own generator; cached after the first run)...", flush=True)
    data = mnist1d(num_samples=cfg.num_samples, seed=42)
    model = mlp(data.num_features, cfg.width, cfg.depth, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    monitor = CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.x.shape[0]
    history: dict[str, list[float]] = {name: [] for name in monitor.layers}
    hist_steps: list[int] = []
    bar = _progress(cfg.steps, cfg.progress)
    report = None
    with monitor:
        perm = torch.randperm(n, generator=gen)
        pos = 0
        for step in range(1, cfg.steps + 1):
            if pos + cfg.batch_size > n:
                perm = torch.randperm(n, generator=gen)
                pos = 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.window == 0:
                last = step == cfg.steps
                # Balance terms use the SGD step's η; momentum rescales it to η/(1−β) (spec §5).
                report = monitor.compute(
                    lr=cfg.lr / (1 - cfg.momentum),
                    weight_decay=cfg.weight_decay,
                    batch_size=cfg.batch_size,
                    exponents=last,
                )
                hist_steps.append(step)
                for name in history:
                    history[name].append(report.mean_alignment([name]))
                if not last:
                    monitor.reset()
                bar.set_postfix(loss=f"{loss.item():.3f}", mean_alpha=f"{report.mean_alignment():.3f}")
            bar.update(1)
    bar.close()
    assert report is not None
    train_acc = _evaluate(model, data.x, data.y)
    test_acc = _evaluate(model, data.x_test, data.y_test)
    elapsed = time.time() - t0

    print()
    print(f"MLP {data.num_features}→{'→'.join([str(cfg.width)] * (cfg.depth - 1))}→{data.num_classes}, SGD lr={cfg.lr} "
          f"momentum={cfg.momentum} weight_decay={cfg.weight_decay}, batch {cfg.batch_size}, {cfg.steps} steps, {elapsed:.0f} s")
    print(f"train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f}")
    print(f"measured over the last {cfg.window} steps:")
    print()
    print(report)
    print()
    print("PAH exponents κ in A ∝ B^κ [95% bootstrap interval] (spec §4):")
    print(report.table("exponents"))
    print()
    print("effective rank (participation ratio) of H_a per layer: "
          + ", ".join(f"{n}: {report.effective_rank[n]['H_a']['participation']:.1f}" for n in report.layers))

    report.to_json(out / "report.json")
    fig_paths = []
    try:
        from .plotting import _plt, plot_history

        report.plot(out / "crh_report.png")
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_history(hist_steps, history, ax, ylabel=f"mean α over six relations ({cfg.metric})")
        ax.set_title("CRH alignment during training (windowed)")
        fig.tight_layout()
        fig.savefig(out / "alignment_history.png", dpi=120)
        fig_paths = [str(out / "crh_report.png"), str(out / "alignment_history.png")]
    except ImportError as e:
        print(f"(plots skipped: {e})")
    summary = {
        "config": asdict(cfg),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "seconds": elapsed,
        "history_steps": hist_steps,
        "history_mean_alpha": history,
        "report": report.to_dict(),
        "figures": fig_paths,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False, default=str))
    print()
    print(f"wrote {out / 'report.json'}, {out / 'summary.json'}" + (f", {', '.join(fig_paths)}" if fig_paths else ""))
    return summary


class _Bar(Protocol):
    """What the demo needs of a progress bar (tqdm's interface)."""

    def set_postfix(self, **kwargs: object) -> None: ...
    def update(self, n: int = 1) -> object: ...
    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: object) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> _Bar:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    bar: _Bar = tqdm(total=total, desc="training", unit="step", mininterval=0.5)
    return bar


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small MLP on MNIST-1D with the CRH monitor and print the six-relation table")
    d = DemoConfig()
    for name in ("steps", "width", "depth", "batch_size", "window", "num_samples", "seed", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "momentum", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--preprocess", choices=["raw", "centered", "normalized"], default=d.preprocess)
    p.add_argument("--metric", choices=["pearson", "cosine"], default=d.metric)
    p.add_argument("--out", default=d.out)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help="a few-second run (600 steps) for smoke tests")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``canonreg`` command and ``python -m canonreg``."""
    parser = argparse.ArgumentParser(prog="canonreg", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    pa = sub.add_parser("ablate", help="run an ablation grid from a TOML config (see canonreg.ablate)", add_help=False)
    pa.add_argument("rest", nargs=argparse.REMAINDER)
    args, rest = parser.parse_known_args(argv)
    if args.command == "ablate":
        from .ablate import main as ablate_main

        return int(ablate_main(list(args.rest) + list(rest)))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "quick")}
    if args.quick:
        kw.update(steps=600, window=200, num_samples=2000)
    run_demo(DemoConfig(**kw))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
