"""Command line: ``canonreg demo`` (the main job) and ``canonreg ablate CONFIG``.

``python -m canonreg demo`` trains a small MLP on MNIST-1D (generated locally with the ``mnist1d``
package's own generator — nothing is downloaded) for about a minute on 2 CPU cores, with the
CRHMonitor on every Linear layer, and prints the six-relation table per layer, the PAH exponents
and the balance terms; it writes the report (JSON) and figures to ``--out``.

Errors (both commands, :func:`main`): every flag is checked before anything is generated, trained or
written. A bad flag, config or file prints one line, ``canonreg <command>: error: <what was expected
and what was received, naming the flag>``, on stderr and exits with status 2; a failure while
running (e.g. training diverged) prints one line and exits with status 1; SIGTERM during an ablation
exits with status 143 (:mod:`canonreg.ablate`). ``--debug`` lets the exception propagate with its
traceback instead.

The batch size must not exceed the training split (``--num-samples`` × 0.8): a larger batch would
train on fewer samples per step than the balance terms and ``summary.json`` record, so it is
rejected rather than clamped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check_bool, check_choice, check_nonnegative, check_nonnegative_int, check_positive, check_positive_int

__all__ = ["DemoConfig", "run_demo", "main", "UsageError", "OneLineParser", "run_command"]


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
        """Check every field (the CLI's only validation: its messages name the flags instead).

        Raises:
            ValueError / TypeError naming the field, the expected and the received value.
        """
        for name in ("steps", "width", "depth", "batch_size", "window", "num_samples"):
            check_positive_int(name, getattr(self, name))
        for name in ("seed", "threads"):
            check_nonnegative_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        m = self.momentum
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1):
            raise ValueError(f"Expected `momentum` to be a float in [0, 1), but got {m!r}")
        check_nonnegative("weight_decay", self.weight_decay)
        check_choice("preprocess", self.preprocess, ("raw", "centered", "normalized"))
        check_choice("metric", self.metric, ("pearson", "cosine"))
        check_bool("progress", self.progress)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"Expected `out` to be a folder path, but got {self.out!r}")
        if self.depth < 2:
            raise ValueError(f"Expected `depth` >= 2 (at least one hidden layer), but got {self.depth}")
        if self.window > self.steps:
            raise ValueError(f"Expected `window` <= `steps` ({self.steps}), but got {self.window}")
        if self.batch_size > self.train_samples:
            raise ValueError(
                f"Expected `batch_size` <= the {self.train_samples} training samples "
                f"(80% of `num_samples` = {self.num_samples}), but got {self.batch_size}"
            )

    @property
    def train_samples(self) -> int:
        """Size of MNIST-1D's training split: ``num_samples · 4 // 5`` (mnist1d's ``train_split`` = 0.8)."""
        return self.num_samples * 4 // 5


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
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")


# ---------------------------------------------------------------------- error handling shared by both commands
class UsageError(ValueError):
    """A bad command line: argparse's complaint, or a value a config rejected (``prog`` names the command)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage and exiting.

    :func:`run_command` turns the error into one line on stderr and exit status 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Let "--weight-decay -1e-3" reach the value check instead of reading "-1e-3" as an option.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-inf$")

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def flag_message(message: str) -> str:
    """A config's message with its backticked field names shown as flags: ```batch_size``` → ```--batch-size```."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: f"`--{m.group(1).replace('_', '-')}`", message)


#: Exit status for a bad flag, config or file (argparse's convention).
EXIT_USAGE = 2
#: Exit status for a failure while running (training diverged, a run failed).
EXIT_FAILURE = 1


def run_command(prog: str, body: Callable[[], int], *, debug: bool) -> int:
    """Run a command's ``body`` with canonreg's CLI error policy; returns the exit status.

    ``UsageError``, ``ValueError``, ``TypeError`` and ``OSError`` raised before ``body`` starts its
    work are the caller's business (``body`` raises them as :class:`UsageError`). Here: a
    :class:`UsageError` → one line, status 2; any other exception → one line naming its type, status
    1; ``KeyboardInterrupt`` → one line, status 130; ``SystemExit`` passes through. Warnings are
    shown as one line each (``<prog>: warning: …``). With ``debug`` every exception propagates.
    """

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show
        try:
            return body()
        except UsageError as e:
            if debug:
                raise
            print(f"{e.prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            print(f"{prog}: error: {type(e).__name__}: {_one_line(str(e))} (--debug shows the traceback)", file=sys.stderr)
            return EXIT_FAILURE


def check_out_dir(flag: str, path: str | Path, prog: str) -> None:
    """Raise :class:`UsageError` unless ``path`` is a folder or can be created as one (checked, not created)."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"lies under {str(probe)!r}, which is a file"
        raise UsageError(f"Expected `{flag}` to be a folder (created if missing), but {str(p)!r} {what}", prog)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _demo_command(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "quick", "debug")}
    if args.quick:
        kw.update(steps=600, window=200, num_samples=2000)
    try:
        cfg = DemoConfig(**kw)
    except (TypeError, ValueError) as e:
        raise UsageError(flag_message(str(e)), "canonreg demo") from e
    check_out_dir("--out", cfg.out, "canonreg demo")
    run_demo(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``canonreg`` command and ``python -m canonreg``; returns the exit status.

    0: done; 1: a failure while running; 2: a bad flag, config or file (one line on stderr, nothing
    run or written); 130: interrupted; 143: SIGTERM during an ablation. ``--debug`` (on either
    command) lets errors propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = OneLineParser(prog="canonreg", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _demo_parser(sub)
    sub.add_parser("ablate", help="run an ablation grid from a TOML config (see canonreg.ablate)", add_help=False)

    def body() -> int:
        if argv[:1] == ["ablate"]:
            from .ablate import main as ablate_main

            return int(ablate_main(argv[1:]))
        args, rest = parser.parse_known_args(argv)
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}", f"canonreg {args.command}")
        return _demo_command(args)

    return run_command("canonreg demo" if argv[:1] == ["demo"] else "canonreg", body, debug=debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
