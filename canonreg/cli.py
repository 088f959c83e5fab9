"""Command line: ``canonreg demo`` (the main job) and ``canonreg ablate CONFIG``.

``python -m canonreg demo`` shows what canonreg changes. It trains two copies of one MLP on MNIST-1D
(generated locally with the ``mnist1d`` package's own generator — nothing is downloaded) under the
same budget — same data, initialisation, batch order, optimizer and steps
(:func:`canonreg.experiment.train_trial`):

* ``baseline``: plain SGD with momentum and weight decay;
* ``crh``: the same step on ``task + crh_loss(model)(task)``, canonreg's joint CRH objective
  (:func:`canonreg.losses.crh_loss`; arm ``"crh"`` of :mod:`canonreg.experiment`).

After training, the six relations of every layer are measured on the full training set with the
task loss's gradient only (:func:`canonreg.measure_crh`; ``normalized``/``pearson`` by default), so
the regulariser's own gradient never enters G. It prints both six-relation tables, their
difference (crh − baseline) and a summary (test accuracy, mean α, min α over the inner layers, the
first layer separately), and writes ``summary.json`` (the configs actually used, every number),
``report_<arm>.json`` and the figure ``crh_comparison.png`` (:func:`canonreg.plotting.plot_comparison`)
to ``--out``. Defaults fit in under 2 minutes on 2 CPU cores; ``--quick`` is a smoke test.

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
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from .errors import check_bool, check_choice, check_nonnegative, check_nonnegative_int, check_positive, check_positive_int
from .experiment import TrialConfig
from .functional import RELATIONS
from .layers import layer_roles
from .stats import write_json

if TYPE_CHECKING:  # pragma: no cover
    from .data import Split
    from .report import CRHReport

__all__ = ["DemoConfig", "DEMO_ARMS", "run_demo", "main", "UsageError", "OneLineParser", "run_command", "check_out_dir"]

#: The two arms the demo compares: the reference first, canonreg's arm second.
DEMO_ARMS: tuple[str, str] = ("baseline", "crh")


@dataclass(frozen=True)
class DemoConfig:
    """Configuration of ``canonreg demo``: the budget both arms share, and how α is measured.

    Attributes:
        steps, batch_size: SGD steps and batch size S, the same for both arms.
        width, depth: MLP hidden width and number of weight layers (``depth − 1`` hidden layers).
        lr, momentum, weight_decay: SGD with momentum; decay on weight matrices only (both arms).
        loss_weight: strength of the ``crh`` arm's objective (``crh_loss(model, weight=…)``);
            None (default) = the preset's, ``canonreg.losses.CRH_PRESET["weight"]``.
        window: training-monitor window in steps; after every window the task-only α is measured
            on the training set for the figure's curves.
        preprocess, metric: the measurement protocol (theory §3).
        num_samples: MNIST-1D samples (train + test, 80/20). seed: initialisation and batch order.
        threads: torch intra-op threads (0 = torch's default). One by default: the matrices are small
            (128 wide), and two threads on 2 busy cores made a crh step 50× slower than one thread.
        out: output folder.
        progress: tqdm bars during training.

    Raises:
        ValueError / TypeError naming the field, for a bad value (checked in full on construction).
    """

    steps: int = 2000
    width: int = 128
    depth: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss_weight: float | None = None
    window: int = 500
    preprocess: str = "normalized"
    metric: str = "pearson"
    num_samples: int = 5000
    seed: int = 0
    threads: int = 1
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
        if self.loss_weight is not None:
            check_nonnegative("loss_weight", self.loss_weight)
        check_choice("preprocess", self.preprocess, ("raw", "centered", "normalized"))
        check_choice("metric", self.metric, ("pearson", "cosine"))
        check_bool("progress", self.progress)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"Expected `out` to be a folder path, but got {self.out!r}")
        if self.depth < 3:
            raise ValueError(f"Expected `depth` >= 3 (an inner layer: one whose input and output are both learned), but got {self.depth}")
        if self.window > self.steps:
            raise ValueError(f"Expected `window` <= `steps` ({self.steps}), but got {self.window}")
        if self.batch_size > self.train_samples:
            raise ValueError(
                f"Expected `batch_size` <= the {self.train_samples} training samples "
                f"(80% of `num_samples` = {self.num_samples}), but got {self.batch_size}"
            )
        for arm in DEMO_ARMS:
            self.trial(arm)  # anything else the trial itself rejects

    @property
    def train_samples(self) -> int:
        """Size of MNIST-1D's training split: ``num_samples · 4 // 5`` (mnist1d's ``train_split`` = 0.8)."""
        return self.num_samples * 4 // 5

    @property
    def crh_weight(self) -> float:
        """The ``crh`` arm's loss weight: ``loss_weight``, or the preset's when it is None."""
        if self.loss_weight is not None:
            return float(self.loss_weight)
        from .losses import CRH_PRESET

        return float(CRH_PRESET["weight"])

    def trial(self, arm: str) -> TrialConfig:
        """The resolved :class:`~canonreg.experiment.TrialConfig` that trains ``arm`` under this budget."""
        return TrialConfig(
            arm=arm,
            dataset="mnist1d",
            num_samples=self.num_samples,
            model="mlp",
            width=self.width,
            depth=self.depth,
            optimizer="sgd",
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            loss_weight=self.crh_weight,
            batch_size=self.batch_size,
            steps=self.steps,
            seed=self.seed,
            preprocess=self.preprocess,
            metric=self.metric,
            eval_every=self.window,
            # The training-time monitor feeds nothing the demo shows (α comes from measure_crh
            # after training, and after every window with track_crh): one step per window keeps it cheap.
            monitor_every=self.window,
            n_bootstrap=0,
            track_crh=True,
        ).resolved()


@dataclass(frozen=True)
class ArmOutcome:
    """One trained arm of the demo, measured after training.

    Attributes:
        trial: the resolved trial config it was trained with.
        report: :func:`canonreg.measure_crh` on the full training set, task-loss gradient only.
        train_accuracy, test_accuracy: after training.
        history: :func:`~canonreg.experiment.train_trial`'s per-window history (with the task-only
            ``min_alpha_inner`` and ``mean_alpha_post``).
        seconds: wall time of training and measurement.
    """

    trial: TrialConfig
    report: CRHReport
    train_accuracy: float
    test_accuracy: float
    history: list[dict[str, float]]
    seconds: float


def alignment_difference(a: CRHReport, b: CRHReport) -> dict[str, dict[str, float]]:
    """``{layer: {relation: α_b − α_a}}`` over the layers of ``a`` (NaN where either is NaN)."""
    if list(a.layers) != list(b.layers):
        raise ValueError(f"Expected two reports over the same layers, but got {a.layers} and {b.layers}")
    return {n: {r: float(b.alignment[n][r]) - float(a.alignment[n][r]) for r in RELATIONS} for n in a.layers}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train the baseline and the crh arm, measure, print, save; returns ``summary.json``'s content.

    See the module docstring. Both arms are trained by :func:`~canonreg.experiment.train_trial` from
    :meth:`DemoConfig.trial` on one loaded split; α comes from :func:`~canonreg.measure_crh` over the
    training split after training.

    Raises:
        FloatingPointError: training diverged (non-finite task loss).
    """
    from .experiment import load_data

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trials = {arm: cfg.trial(arm) for arm in DEMO_ARMS}
    print(f"Generating MNIST-1D locally ({cfg.num_samples} samples, mnist1d's own generator; cached after the first run)...", flush=True)
    data = load_data(trials[DEMO_ARMS[0]])
    dims = "→".join([str(data.x.shape[1]), *[str(cfg.width)] * (cfg.depth - 1), str(int(data.y.max()) + 1)])
    print(
        f"MLP {dims}; SGD lr={cfg.lr:g} momentum={cfg.momentum:g} weight_decay={cfg.weight_decay:g}; batch {cfg.batch_size} "
        f"of {int(data.x.shape[0])} training samples; {cfg.steps} steps per arm (same data, initialisation and batch order).",
        flush=True,
    )
    outcomes = {arm: _train_arm(cfg, arm, trial, data, k, len(trials)) for k, (arm, trial) in enumerate(trials.items(), 1)}
    stats = _print_comparison(cfg, outcomes, int(data.x.shape[0]))
    elapsed = time.perf_counter() - t0
    figures = _write_figure(cfg, outcomes, out, dims)
    for arm in DEMO_ARMS:
        outcomes[arm].report.to_json(out / f"report_{arm}.json")
    summary = _demo_summary(cfg, outcomes, stats, data, figures, elapsed)
    write_json(out / "summary.json", summary)
    print()
    written = [str(out / "summary.json"), *(str(out / f"report_{a}.json") for a in DEMO_ARMS), *figures]
    print(f"{elapsed:.0f} s in total; wrote {', '.join(written)}")
    return summary


def _train_arm(cfg: DemoConfig, arm: str, trial: TrialConfig, data: Split, k: int, n: int) -> ArmOutcome:
    """Train one arm (:func:`~canonreg.experiment.train_trial`), then measure it on the training split."""
    from .experiment import evaluate, train_trial
    from .measure import measure_crh

    what = "plain SGD" if arm == "baseline" else f"SGD on task + crh_loss(model, weight={trial.loss_weight:g})(task)"
    print(f"[{k}/{n}] {arm}: {what}", flush=True)
    t = time.perf_counter()
    try:
        trained = train_trial(trial, data=data, progress=cfg.progress)
    except FloatingPointError as e:
        at = re.search(r"at step \d+", str(e))
        raise FloatingPointError(
            f"training the {arm} arm diverged (non-finite task loss{' ' + at.group(0) if at else ''}) with "
            f"lr={cfg.lr:g}, momentum={cfg.momentum:g}; try a smaller --lr"
        ) from e
    report = measure_crh(trained.model, data.x, data.y, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    acc = evaluate(trained.model, data)
    outcome = ArmOutcome(trial, report, float(acc["train_acc"]), float(acc["test_acc"]), trained.history, time.perf_counter() - t)
    print(f"      done in {outcome.seconds:.0f} s: test accuracy {outcome.test_accuracy:.3f}", flush=True)
    return outcome


def _print_comparison(cfg: DemoConfig, outcomes: Mapping[str, ArmOutcome], n_train: int) -> dict[str, dict[str, float]]:
    """Print both six-relation tables, their difference and the summary table; returns the summary's numbers."""
    base, crh = (outcomes[a] for a in DEMO_ARMS)
    layers = list(base.report.layers)
    roles = layer_roles(layers)
    print()
    print(
        f"α after training: {cfg.metric} α of the six relations, {cfg.preprocess} rows, over all {n_train} training samples, "
        "task-loss gradient only (canonreg.measure_crh)"
    )
    for arm in DEMO_ARMS:
        o = outcomes[arm]
        print()
        print(f"{arm}: test accuracy {o.test_accuracy:.3f} (train {o.train_accuracy:.3f})")
        print(alignment_table({n: o.report.alignment[n] for n in layers}, roles))
    print()
    print(f"difference {DEMO_ARMS[1]} − {DEMO_ARMS[0]}:")
    dmin = {n: _row_min(crh.report.alignment[n]) - _row_min(base.report.alignment[n]) for n in layers}
    print(alignment_table(alignment_difference(base.report, crh.report), roles, signed=True, last=("Δmin", dmin)))
    inner = [n for n in layers if roles[n] == "inner"]
    stats = {arm: arm_statistics(outcomes[arm], layers, inner) for arm in DEMO_ARMS}
    print()
    print(summary_table(stats))
    return stats


def _write_figure(cfg: DemoConfig, outcomes: Mapping[str, ArmOutcome], out: Path, dims: str) -> list[str]:
    """``crh_comparison.png`` (:func:`~canonreg.plotting.plot_comparison`); none, with a note, without matplotlib."""
    try:
        from .plotting import _plt, plot_comparison

        path = out / "crh_comparison.png"
        fig = plot_comparison(
            {arm: outcomes[arm].report for arm in DEMO_ARMS},
            path,
            history={arm: outcomes[arm].history for arm in DEMO_ARMS},
            suptitle=f"MNIST-1D MLP {dims}, {cfg.steps} SGD steps per arm; α after training (task gradient only, training set)",
        )
        _plt().close(fig)
        return [str(path)]
    except ImportError as e:
        print(f"(figure skipped: {e})")
        return []


def _demo_summary(
    cfg: DemoConfig, outcomes: Mapping[str, ArmOutcome], stats: Mapping[str, Mapping[str, float]], data: Split, figures: list[str], elapsed: float
) -> dict[str, Any]:
    """The content of ``summary.json``: configs, measurement protocol, every number."""
    base, crh = (outcomes[a] for a in DEMO_ARMS)
    layers = list(base.report.layers)
    roles = layer_roles(layers)
    n_train = int(data.x.shape[0])
    measurement = {
        "function": "canonreg.measure_crh", "data": "training split, every sample", "samples": n_train,
        "gradient": "task loss (cross-entropy) only", "when": "after training", "preprocess": cfg.preprocess, "metric": cfg.metric,
    }  # fmt: skip
    arms = {
        arm: {**stats[arm], "alignment": outcomes[arm].report.alignment, "history": outcomes[arm].history, "seconds": outcomes[arm].seconds}
        for arm in DEMO_ARMS
    }
    return {
        "config": asdict(cfg),
        "trials": {arm: outcomes[arm].trial.to_dict() for arm in DEMO_ARMS},
        "train_samples": n_train,
        "test_samples": int(data.x_test.shape[0]),
        "measurement": measurement,
        "layers": layers,
        "roles": roles,
        "inner_layers": [n for n in layers if roles[n] == "inner"],
        "arms": arms,
        "difference": alignment_difference(base.report, crh.report),
        "figures": figures,
        "seconds": elapsed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def arm_statistics(o: ArmOutcome, layers: Sequence[str], inner: Sequence[str]) -> dict[str, float]:
    """Test/train accuracy, mean α (all layers), min α over the inner layers and over the first layer."""
    from .measure import min_alignment

    return {
        "test_accuracy": o.test_accuracy,
        "train_accuracy": o.train_accuracy,
        "mean_alpha": o.report.mean_alignment(on_nan="propagate"),  # NaN shows in the table; never averaged away
        "min_alpha_inner": min_alignment(o.report, inner) if inner else math.nan,
        "min_alpha_first": min_alignment(o.report, [layers[0]]),
    }


def alignment_table(
    values: Mapping[str, Mapping[str, float]],
    roles: Mapping[str, str],
    *,
    signed: bool = False,
    last: tuple[str, Mapping[str, float]] | None = None,
) -> str:
    """Fixed-width table: one row per layer (name, role), the six relations, then a last column.

    The last column is ``last = (header, {layer: value})`` when given, else the row's minimum.
    ``signed`` shows every number with its sign (for differences).
    """

    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")

    header, column = last if last is not None else ("min", {n: _row_min(row) for n, row in values.items()})
    w = max([5, *(len(n) for n in values)]) + 2
    rows = [f"{'layer':<{w}}{'role':<7}" + "".join(f"{r:>8}" for r in RELATIONS) + f"{header:>8}"]
    for n, row in values.items():
        rows.append(f"{n:<{w}}{roles.get(n, ''):<7}" + "".join(f"{fmt(float(row[r])):>8}" for r in RELATIONS) + f"{fmt(float(column[n])):>8}")
    return "\n".join(rows)


def _row_min(row: Mapping[str, float]) -> float:
    vals = [float(row[r]) for r in RELATIONS]
    return math.nan if any(math.isnan(v) for v in vals) else min(vals)


def summary_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    """Rows: test accuracy, mean α, min α (inner layers), min α (first layer); columns: the arms and their difference."""
    a, b = list(stats)
    labels = {
        "test_accuracy": "test accuracy",
        "mean_alpha": "mean α (all layers, six relations)",
        "min_alpha_inner": "min α (inner layers, six relations)",
        "min_alpha_first": "min α (first layer: its H_a is the data's)",
    }
    w = max(len(v) for v in labels.values()) + 2
    lines = [f"{'':<{w}}{a:>10}{b:>10}{b + ' − ' + a:>18}"]
    for key, label in labels.items():
        x, y = float(stats[a][key]), float(stats[b][key])
        lines.append(f"{label:<{w}}{x:>10.3f}{y:>10.3f}{y - x:>+18.3f}")
    return "\n".join(lines)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train plain SGD and canonreg's CRH arm side by side on MNIST-1D; compare their six-relation tables",
        description="Train plain SGD and canonreg's CRH arm under the same budget and compare the six relations after training.",
    )
    d = DemoConfig()
    helps = {
        "steps": "SGD steps per arm",
        "width": "hidden width of the MLP",
        "depth": "weight layers of the MLP (>= 3: one inner layer at least)",
        "batch_size": "batch size S (<= the training split: 80%% of --num-samples)",
        "window": "steps between the task-only α measurements drawn in the figure",
        "num_samples": "MNIST-1D samples, train + test (80/20)",
        "seed": "initialisation and batch order (the same for both arms)",
        "threads": "torch threads (0 = torch's default)",
        "lr": "SGD learning rate",
        "momentum": "SGD momentum in [0, 1)",
        "weight_decay": "weight decay on weight matrices (both arms)",
    }
    for name in ("steps", "width", "depth", "batch_size", "window", "num_samples", "seed", "threads"):
        # flags --quick sets default to None here, so that one given explicitly (whatever its value) wins
        default = None if name in QUICK else getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"{helps[name]} (default {getattr(d, name)})")
    for name in ("lr", "momentum", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name), help=f"{helps[name]} (default {getattr(d, name):g})")
    p.add_argument("--loss-weight", type=float, default=None, help="strength of the crh arm's objective (default: the preset's, canonreg.losses.CRH_PRESET)")
    p.add_argument("--preprocess", choices=["raw", "centered", "normalized"], default=d.preprocess, help="measurement protocol (theory §3)")
    p.add_argument("--metric", choices=["pearson", "cosine"], default=d.metric, help="alignment score α (default pearson)")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help=f"a smoke test: {QUICK['steps']} steps, {QUICK['num_samples']} samples")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")


#: What ``--quick`` sets (flags given explicitly still win).
QUICK: dict[str, int] = {"steps": 300, "window": 100, "num_samples": 2000}


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
    unset = [k for k in QUICK if kw[k] is None]  # not given on the command line
    base = QUICK if args.quick else {k: getattr(DemoConfig(), k) for k in QUICK}
    kw.update({k: base[k] for k in unset})
    if args.quick and "window" in unset:
        kw["window"] = min(kw["window"], kw["steps"])  # `--quick --steps 50`: the window follows the steps
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
    if argv[:1] == ["--debug"]:  # `canonreg --debug demo …` means `canonreg demo … --debug`
        argv = [*argv[1:], "--debug"]
    parser = OneLineParser(
        prog="canonreg",
        description="canonreg: measure the six CRH relations of a network and push them to hold. "
        "`canonreg demo` compares plain SGD with canonreg's CRH arm; `canonreg ablate CONFIG` runs an ablation grid.",
    )
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
