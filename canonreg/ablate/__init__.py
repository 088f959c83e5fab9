"""Ablation runner: a grid of :class:`~canonreg.experiment.TrialConfig` trials, run in parallel, resumable,
summarised over seeds as tables and plots.

A config (TOML file or the equivalent Python dict) has these tables; every key is checked before
anything runs, and a bad one is rejected with a message naming it:

.. code-block:: toml

    [ablation]                       # all optional
    name = "wd-arms"
    out = "runs/wd-arms"             # output folder (default "runs/<name>"; --quick adds "-quick")
    workers = 2                      # worker processes (default: all CPUs; 0 = in this process)
    backend = "local"                # "local" (ProcessPoolExecutor, spawn) or "ray"
    logs = "none"                    # per-run logs: "none" | "csv" | "tensorboard" (canonreg.writers)
    metrics = ["test_acc", "mean_alpha", "erank_penultimate", "nc1"]   # summary columns

    [fixed]                          # TrialConfig fields shared by every run (else their defaults)
    steps = 400
    width = 64

    [grid]                           # factors: TrialConfig fields, each a non-empty list of values
    arm = ["baseline", "loss", "noise", "both"]
    weight_decay = [1e-4, 1e-3]
    seed = [0, 1, 2]
    # relations = [["f-RWA", "b-RWA"], ["f-RGA"]]   (each value is a list of relation names)

    [[plot]]                         # optional; default: every metric against every numeric factor
    metric = "mean_alpha"
    factor = "weight_decay"

    [quick]                          # applied by --quick: a scalar fixes a field, a list sets a factor
    steps = 60
    seed = [0]

The runs are the Cartesian product of the grid over the fixed values, each resolved
(:meth:`TrialConfig.resolved`: factors that do not act in an arm take their neutral value) and
de-duplicated, so ``arm × noise`` runs the baseline once, not once per noise level. **Same budget**:
every arm of one grid cell shares ``steps`` and ``batch_size`` (and data, initialisation and batch
order per seed); the runner never lets an arm change them.

Outputs in ``out``: ``results.jsonl`` (one line per finished run: run id, resolved config, results,
environment), ``errors.jsonl`` (failed runs with tracebacks; they are retried on the next start),
``summary.md`` and ``summary.csv`` (mean and 95% Student-t interval over seeds, one row per
combination of the other varying factors), ``plots/<metric>_vs_<factor>.png``, ``spec.json`` and,
with ``logs``, ``logs/<run id>/``.

Resuming: a run's id is a hash of its resolved config (:func:`canonreg.experiment.config_id`). On
start, the ids already in ``results.jsonl`` are skipped. Each record is written with a single
``write`` and ``fsync``, so a crash can only leave the last line incomplete. Every line is checked
(:func:`load_results`): JSON, a ``run_id``, a ``config`` that is a valid TrialConfig whose id is the
``run_id``, a ``result`` table. A line that fails — an incomplete last line, corrupt text, a damaged
config — is moved to ``results.rejected.jsonl`` (line number, reason, text) with one warning naming
the line, and its run is recomputed; every valid record is kept byte for byte. A complete last
record that lacks only its final newline is valid: it is kept and the newline added.

Interrupts: SIGTERM (when the runner runs in the main thread with the default SIGTERM action) and
Ctrl-C stop the worker processes before the runner exits — no worker or resource tracker outlives
it; a worker also exits by itself if its parent dies. Finished runs stay in ``results.jsonl``; the
next start resumes. The CLI exits with status 143 after SIGTERM, 130 after Ctrl-C.

Determinism: every trial runs with ``torch.set_num_threads(1)`` (worker processes, Ray tasks and the
in-process mode alike) and is seeded from its config, so the same config gives the same numbers bit
for bit in one environment, whichever backend or worker count ran it.

Measuring the trained models: ``run_ablation(config, measure="package.module:function",
measure_args={...})`` calls ``function(trained, split, **measure_args) -> dict`` on every trained run
in its worker (:class:`~canonreg.experiment.TrainedTrial`: model, resolved config, the monitor's last
window) and stores the dict in the run's record under ``"measure"`` — for what ``run_trial``'s metrics
do not hold (representations on other data, attacks, refits). See :mod:`canonreg.ablate.measure`.

Interval over seeds: with ``n`` finite values, mean ``m`` and sample standard deviation ``s``,
``m ± t_{0.975, n−1} · s / √n`` (:func:`mean_ci`; no interval for ``n = 1``).

Example:
    >>> result = run_ablation("examples/ablation.toml", workers=2)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP

CLI: ``canonreg ablate CONFIG [--out DIR] [--workers N] [--backend local|ray] [--resume/--no-resume]
[--quick]`` (:func:`main`).

Modules, one job each: :mod:`~canonreg.ablate.spec` (the grid and its validation),
:mod:`~canonreg.ablate.runner` (processes / Ray, interrupts, resuming), :mod:`~canonreg.ablate.store`
(``results.jsonl``), :mod:`~canonreg.ablate.tables` (summaries over seeds), :mod:`~canonreg.ablate.plots`
(figures), :mod:`~canonreg.ablate.measure` (user measurements in the workers), :mod:`~canonreg.ablate.cli`
(``canonreg ablate``). Intervals and run metadata come from
:mod:`canonreg.stats`.
"""

from __future__ import annotations

from ..stats import Interval, code_fingerprint, mean_ci, t_quantile
from .cli import PROG, main
from .measure import MeasureError
from .plots import plot_metric
from .runner import AblationResult, Terminated, run_ablation
from .spec import (
    ARM_COLORS,
    BACKENDS,
    DEFAULT_METRICS,
    LOG_KINDS,
    TIMING_KEYS,
    AblationSpec,
    Backend,
    LogKind,
    PlotSpec,
    load_spec,
)
from .store import load_results
from .tables import summarize, summary_csv, summary_markdown, write_summaries

__all__ = [
    "PlotSpec",
    "AblationSpec",
    "AblationResult",
    "Interval",
    "load_spec",
    "run_ablation",
    "load_results",
    "summarize",
    "write_summaries",
    "summary_markdown",
    "summary_csv",
    "plot_metric",
    "mean_ci",
    "t_quantile",
    "code_fingerprint",
    "Terminated",
    "MeasureError",
    "main",
    "ARM_COLORS",
    "BACKENDS",
    "DEFAULT_METRICS",
    "LOG_KINDS",
    "TIMING_KEYS",
    "Backend",
    "LogKind",
    "PROG",
]
