"""``canonreg ablate CONFIG …``: the command line of the ablation runner."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

from .runner import Terminated, _measure_call, _prepare, _run_prepared
from .spec import BACKENDS

PROG = "canonreg ablate"


def _workers_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int (0 = in this process), but got {text!r}")
    return value


def _json_object(flag: str, text: str | None) -> dict[str, object] | None:
    """``text`` parsed as a JSON object (None stays None); a clear error naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"Expected `{flag}` to be a JSON object such as '{{\"k\": 1}}', but got {text!r} ({e.msg})") from e
    if not isinstance(value, dict):
        raise ValueError(f"Expected `{flag}` to be a JSON object such as '{{\"k\": 1}}', but got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from ..cli import OneLineParser

    p = OneLineParser(
        prog=PROG,
        description="Run an ablation grid from a TOML config (see `python -c 'import canonreg.ablate as a; help(a)'`): "
        "parallel, resumable, summarised over seeds as Markdown/CSV tables and plots.",
    )
    p.add_argument("config", help="TOML file with [ablation], [fixed], [grid], [[plot]], [quick] tables")
    p.add_argument("--out", default=None, help="output folder (default: the config's ablation.out, else runs/<name>)")
    p.add_argument("--workers", type=_workers_arg, default=None, help="worker processes (default: the config's, else all CPUs; 0 = in this process)")
    p.add_argument("--backend", choices=list(BACKENDS), default=None, help="local processes or Ray (default: the config's, else local)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip runs already in results.jsonl (default: on)")
    p.add_argument("--quick", action="store_true", help="apply the config's [quick] overrides (a smoke-test-sized grid)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the figures")
    p.add_argument(
        "--measure", default=None, metavar="MODULE:FUNCTION",
        help="a measurement of every trained model, run in the worker: function(trained, split, **args) -> dict (stored under 'measure')",
    )  # fmt: skip
    p.add_argument("--measure-args", default=None, metavar="JSON", help="keyword arguments of --measure as a JSON object")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``canonreg ablate CONFIG [--out DIR] [--workers N] [--backend local|ray] [--resume/--no-resume] [--quick]
    [--measure MODULE:FUNCTION [--measure-args JSON]] [--debug]``.

    Prints the Markdown summary. Exit status: 0 when every run finished; 1 when some failed (see
    ``errors.jsonl``; they are retried on the next start); 2 for a bad flag, config or output folder
    (one line on stderr naming it; nothing ran or was written); 143 after SIGTERM, 130 after Ctrl-C
    (workers stopped; finished runs kept, the next start resumes). Warnings (e.g. damaged result
    lines moved aside) are one line each on stderr. ``--debug`` shows tracebacks instead.
    """
    from ..cli import UsageError, check_out_dir, run_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = _parser().parse_args(argv)
        if args.out is not None:
            check_out_dir("--out", args.out, PROG)
        try:
            prepared = _prepare(args.config, out=args.out, workers=args.workers, backend=args.backend, quick=args.quick, progress=args.progress)
            call = _measure_call(args.measure, _json_object("--measure-args", args.measure_args))
        except (ValueError, TypeError, OSError, ImportError) as e:
            raise UsageError(" ".join(str(e).split()), PROG) from e
        try:
            result = _run_prepared(*prepared, resume=args.resume, progress=args.progress, plots=args.plots, measure=call)
        except Terminated as e:
            print(f"{PROG}: stopped by {signal.Signals(e.signum).name}; finished runs are kept, rerun to resume", file=sys.stderr)
            return int(e.code) if isinstance(e.code, int) else 143
        print(result.markdown)
        print()
        print(
            f"{len(result.configs)} runs: {result.new_runs} run now, {result.skipped_runs} already finished"
            + (f", {len(result.failures)} FAILED (see {result.out / 'errors.jsonl'})" if result.failures else "")
        )
        cpu = [r["result"].get("cpu_time_s") for r in result.records.values()]
        cpu_total = sum(c for c in cpu if isinstance(c, (int, float)))
        print(f"trial CPU time: {cpu_total:.0f} s in total over {len(result.records)} finished runs")
        if result.stale_runs:
            print(f"note: {len(result.stale_runs)} finished run(s) came from different canonreg code (--no-resume reruns them)")
        files = [result.out / name for name in ("results.jsonl", "errors.jsonl", "summary.md", "summary.csv")]
        print(f"wrote {', '.join(str(f) for f in files if f.exists())}"
              + (f" and {len(result.plots)} plot(s) in {result.out / 'plots'}" if result.plots else ""))  # fmt: skip
        return 1 if result.failures else 0

    return run_command(PROG, body, debug="--debug" in argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
